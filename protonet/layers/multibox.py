"""SSD's MultiBoxLoss, as Wei Liu's Caffe fork (weiliu89/caffe, branch `ssd`) computes it.

Bottoms: loc predictions [N, P*4], confidences [N, P*C] (raw scores), priors
[1, 2, P*4] (PriorBox's top) and ground truth [1, 1, G, 8] rows of [item, label, xmin,
ymin, xmax, ymax, difficult] (AnnotatedData's label top; item -1 rows are padding).
The matching and mining are discrete choices made without gradients, in the fork's
order: priors are matched to ground truth by the fork's MatchBBox (a bipartite pass
that gives every box its best free prior, then, for PER_PREDICTION, every free prior
its best box at overlap >= overlap_threshold); MAX_NEGATIVE mining keeps, per image,
the neg_pos_ratio x positives unmatched priors (overlap < neg_overlap) with the largest
softmax loss. The loss is then loc_weight * SmoothL1 (or L2 / 2) of the matched
priors' predictions against their encoded boxes plus the softmax loss of the positives
and mined negatives, both divided by the normalizer (VALID: the number of matches);
its gradient is the fork's Backward (the smooth L1 / softmax derivatives of the chosen
rows, zero elsewhere). Supported: share_location with prior-based matching (the fork's
own restriction for mining), SOFTMAX confidences, mining NONE or MAX_NEGATIVE without
nms_param; other settings are refused by name.
"""
from __future__ import annotations

import torch

from ..proto import caffe_pb2
from .base import Layer
from .detection import box_sizes
from .loss import _SoftmaxLossFunction, loss_normalizer
from .registry import register

MBL = caffe_pb2.MultiBoxLossParameter
CODE = caffe_pb2.PriorBoxParameter
FLT_MIN = float(torch.finfo(torch.float32).tiny)


def cross_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fork's JaccardOverlap of every box of a [A, 4] with every box of b [B, 4]."""
    sa, sb = box_sizes(a), box_sizes(b)
    width = torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0],
                                                                        b[None, :, 0])
    height = torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1],
                                                                         b[None, :, 1])
    inter = width * height
    overlap = inter / (sa[:, None] + sb[None, :] - inter)
    return torch.where((width > 0) & (height > 0), overlap, torch.zeros_like(overlap))


def match_priors(priors: torch.Tensor, gt: torch.Tensor, per_prediction: bool,
                 threshold: float, ignore_cross_boundary: bool):
    """The fork's MatchBBox with label -1: (match [P] gt index, -1 none, -2 ignored;
    overlap [P])."""
    count = priors.shape[0]
    match = torch.full((count,), -1, dtype=torch.long, device=priors.device)
    overlaps = cross_iou(priors, gt)                                  # [P, G]
    if ignore_cross_boundary:
        outside = ((priors < 0) | (priors > 1)).any(dim=1)
        match[outside] = -2
        overlaps[outside] = 0
    present = overlaps > 1e-6
    best = torch.where(present, overlaps, torch.zeros_like(overlaps)).max(dim=1).values
    candidates = torch.where(present, overlaps, torch.full_like(overlaps, -1.0))
    # Bipartite: the largest overlap left among free priors and unmatched boxes, first
    # prior then first box on ties, until no pair is left.
    for _ in range(gt.shape[0]):
        flat = int(torch.argmax(candidates))
        i, j = divmod(flat, gt.shape[0])
        if candidates[i, j] < 0:
            break
        match[i] = j
        best[i] = candidates[i, j]
        candidates[i, :] = -1.0
        candidates[:, j] = -1.0
    if per_prediction:
        free = match == -1
        eligible = present & (overlaps >= threshold) & free[:, None]
        scored = torch.where(eligible, overlaps, torch.full_like(overlaps, -1.0))
        value, index = scored.max(dim=1)
        chosen = value >= 0
        match = torch.where(chosen, index, match)
        best = torch.where(chosen, value, best)
    return match, best


def encode_boxes(priors: torch.Tensor, variances: torch.Tensor, boxes: torch.Tensor,
                 code_type: int, variance_in_target: bool) -> torch.Tensor:
    """The fork's EncodeBBox for matched pairs (rows of priors, variances and boxes)."""
    var = torch.ones_like(variances) if variance_in_target else variances
    if code_type == CODE.CORNER:
        return (boxes - priors) / var
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    if code_type == CODE.CORNER_SIZE:
        return (boxes - priors) / torch.stack([pw, ph, pw, ph], dim=1) / var
    pcx, pcy = (priors[:, 0] + priors[:, 2]) / 2, (priors[:, 1] + priors[:, 3]) / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bcx, bcy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return torch.stack([(bcx - pcx) / pw / var[:, 0], (bcy - pcy) / ph / var[:, 1],
                        torch.log(bw / pw) / var[:, 2], torch.log(bh / ph) / var[:, 3]],
                       dim=1)


@register("MultiBoxLoss")
class MultiBoxLoss(Layer):
    exact_bottoms = 4
    exact_tops = 1
    is_loss = True

    def setup(self, bottom_shapes):
        p = self.param.multibox_loss_param
        if not p.HasField("num_classes") or p.num_classes < 1:
            raise self.error("multibox_loss_param needs num_classes >= 1")
        self.p = p
        self.num_classes = p.num_classes
        if not p.share_location:
            raise self.error("share_location: false is not supported (SSD's nets share "
                             "locations; the fork mines negatives only then)")
        if not p.use_prior_for_matching:
            raise self.error("use_prior_for_matching: false is not supported")
        if p.conf_loss_type != MBL.SOFTMAX:
            raise self.error("conf_loss_type LOGISTIC is not supported; use SOFTMAX")
        if p.mining_type == MBL.HARD_EXAMPLE:
            raise self.error("mining_type HARD_EXAMPLE is not supported; use MAX_NEGATIVE "
                             "or NONE")
        if p.mining_type != MBL.NONE and p.HasField("nms_param") \
                and p.nms_param.nms_threshold > 0:
            raise self.error("nms_param in negative mining is not supported")
        if p.map_object_to_agnostic:
            raise self.error("map_object_to_agnostic is not supported")
        if p.background_label_id >= self.num_classes:
            raise self.error(f"background_label_id {p.background_label_id} is not below "
                             f"num_classes {self.num_classes}")
        if p.HasField("do_neg_mining") and p.do_neg_mining != (p.mining_type != MBL.NONE):
            raise self.error("do_neg_mining contradicts mining_type")
        loss_param = self.param.loss_param
        if not loss_param.HasField("normalization") and loss_param.HasField("normalize"):
            self.normalization = (caffe_pb2.LossParameter.VALID if loss_param.normalize
                                  else caffe_pb2.LossParameter.BATCH_SIZE)
        else:
            self.normalization = loss_param.normalization
        down = list(self.param.propagate_down)
        self.use_loc = down[0] if down else True
        self.use_conf = down[1] if len(down) > 1 else True

    def allow_force_backward(self, bottom_index):
        return bottom_index < 2

    def reshape(self, bottom_shapes):
        loc, conf, priors, gt = bottom_shapes
        if loc[0] != conf[0]:
            raise self.shape_error(f"loc {list(loc)} and conf {list(conf)} differ in num")
        if len(priors) != 3 or priors[1] != 2 or priors[2] % 4:
            raise self.shape_error(f"priors must be [1, 2, P*4], got {list(priors)}")
        count = priors[2] // 4
        if count * 4 != _per_item(loc):
            raise self.shape_error(f"{count} priors need {count * 4} loc values per item, "
                                   f"got {_per_item(loc)}")
        if count * self.num_classes != _per_item(conf):
            raise self.shape_error(f"{count} priors need {count * self.num_classes} "
                                   f"confidences per item, got {_per_item(conf)}")
        if len(gt) != 4 or gt[3] != 8:
            raise self.shape_error(f"ground truth must be [1, 1, G, 8], got {list(gt)}")
        return [()]

    # -- forward ------------------------------------------------------------------------
    def forward(self, loc, conf, priors, gt):
        num, count = loc.shape[0], priors.shape[2] // 4
        with torch.no_grad():
            truth, positives, negatives = self._choose(loc.detach(), conf.detach(),
                                                       priors.detach(), gt.detach())
        normalizer = loss_normalizer(self.normalization,
                                     torch.tensor(len(positives[0]), device=loc.device),
                                     num, count)
        loss = loc.new_zeros(())
        if self.use_loc and len(positives[0]):
            loss = loss + self.p.loc_weight * self._loc_loss(loc, priors, truth,
                                                             positives) / normalizer
        if self.use_conf:
            loss = loss + self._conf_loss(conf, positives, negatives, num, count, normalizer)
        return loss

    def _choose(self, loc, conf, priors, gt):
        """(the matched boxes [M, 4], positives (image, prior, label), negatives
        (image, prior)) as tensors, image by image, priors ascending (the fork's order)."""
        p = self.p
        count = priors.shape[2] // 4
        prior = priors.reshape(-1, 2, count * 4)[0].float()
        prior_boxes = prior[0].view(count, 4)
        rows = gt.reshape(-1, 8).float()
        rows = rows[rows[:, 0] != -1]
        if bool((rows[:, 1].long() == p.background_label_id).any()):
            raise self.error("found the background label in the ground truth")
        if not p.use_difficult_gt:
            rows = rows[rows[:, 7] == 0]
        scores = conf.reshape(conf.shape[0], count, self.num_classes).float()
        pos_img, pos_prior, pos_truth, pos_label, neg_img, neg_prior = [], [], [], [], [], []
        for i in range(loc.shape[0]):
            mine = rows[rows[:, 0].long() == i]
            if not len(mine):
                continue
            match, overlap = match_priors(prior_boxes, mine[:, 3:7],
                                          p.match_type == MBL.PER_PREDICTION,
                                          p.overlap_threshold, p.ignore_cross_boundary_bbox)
            matched = torch.nonzero(match > -1).squeeze(1)
            labels = mine[match[matched], 1].long()
            pos_img.append(torch.full_like(matched, i))
            pos_prior.append(matched)
            pos_truth.append(mine[match[matched], 3:7])
            pos_label.append(labels)
            if p.mining_type == MBL.MAX_NEGATIVE:
                chosen = self._mine(scores[i], match, overlap, labels, matched)
                neg_img.append(torch.full_like(chosen, i))
                neg_prior.append(chosen)
        device = loc.device
        cat = (lambda parts: torch.cat(parts) if parts
               else torch.zeros(0, dtype=torch.long, device=device))
        positives = (cat(pos_img), cat(pos_prior), cat(pos_label))
        truth = torch.cat(pos_truth) if pos_truth else prior_boxes[:0]
        return truth, positives, (cat(neg_img), cat(neg_prior))

    def _mine(self, scores, match, overlap, labels, matched):
        """MAX_NEGATIVE: the unmatched priors (overlap < neg_overlap) with the largest
        softmax loss, neg_pos_ratio per positive; ascending prior order."""
        p = self.p
        target = torch.full_like(match, p.background_label_id)
        target[matched] = labels
        prob = torch.softmax(scores, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -torch.log(prob.clamp(min=FLT_MIN))
        eligible = (match == -1) & (overlap < p.neg_overlap)
        wanted = min(int(len(matched) * p.neg_pos_ratio), int(eligible.sum()))
        if wanted == 0:
            return torch.zeros(0, dtype=torch.long, device=match.device)
        ranked = torch.where(eligible, loss, torch.full_like(loss, -float("inf")))
        order = torch.sort(ranked, descending=True, stable=True).indices[:wanted]
        return torch.sort(order).values

    def _loc_loss(self, loc, priors, truth, positives):
        p = self.p
        img, prior_index, _ = positives
        count = priors.shape[2] // 4
        prior = priors.detach().reshape(-1, 2, count * 4)[0].float()
        prior_boxes, variances = prior[0].view(count, 4), prior[1].view(count, 4)
        target = encode_boxes(prior_boxes[prior_index], variances[prior_index], truth,
                              p.code_type, p.encode_variance_in_target)
        pred = loc.reshape(loc.shape[0], count, 4)[img, prior_index]
        if p.bp_inside:
            outside = (prior_boxes[prior_index] < 0) | (prior_boxes[prior_index] > 1)
            pred = torch.where(outside, target.to(pred.dtype), pred)
        if p.encode_variance_in_target:
            # The fork divides the copied predictions by the variances and copies the
            # gradient back undivided: the value changes, the gradient passes as is.
            held = pred.detach()
            pred = pred + (held / variances[prior_index] - held)
            target = target / variances[prior_index]
        diff = pred - target.to(pred.dtype)
        if p.loc_loss_type == MBL.L2:
            return 0.5 * (diff * diff).sum()
        absolute = diff.abs()
        return torch.where(absolute < 1, 0.5 * diff * diff, absolute - 0.5).sum()

    def _conf_loss(self, conf, positives, negatives, num, count, normalizer):
        scores = conf.reshape(num, count, self.num_classes)
        img, prior_index, labels = positives
        if self.p.mining_type == MBL.NONE:
            target = torch.full((num, count), self.p.background_label_id, dtype=torch.long,
                                device=conf.device)
            target[img, prior_index] = labels
            rows, index = scores.reshape(-1, self.num_classes), target.reshape(-1)
        else:
            neg_img, neg_prior = negatives
            rows = torch.cat([scores[img, prior_index], scores[neg_img, neg_prior]])
            index = torch.cat([labels, torch.full_like(neg_prior, self.p.background_label_id)])
            if not len(rows):
                return conf.new_zeros(())
        valid = torch.ones_like(index, dtype=torch.bool)
        loss, _ = _SoftmaxLossFunction.apply(rows, index, valid, normalizer)
        return loss


def _per_item(shape) -> int:
    total = 1
    for d in shape[1:]:
        total *= d
    return total
