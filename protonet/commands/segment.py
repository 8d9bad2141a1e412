"""`protonet segment`: label maps of images under an FCN / SegNet / PSPNet-style net.

For each image, a colour overlay PNG (PASCAL VOC palette) and the raw label PNG go to
--out; --json prints each image's per-class pixel fractions. Preprocessing comes from
the zoo entry or the flags, as for `classify`. torch loads only when the command runs.
"""
from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    from .classify import add_model_arguments
    p = sub.add_parser("segment", help="label maps (colour overlay PNGs) of images with a "
                                       "segmentation net",
                       description="Run an FCN/SegNet/PSPNet-style net whose output is a "
                                   "(1, C, H, W) score map; write each image's label map as "
                                   "a colour overlay PNG and a raw label PNG.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", default=".", help="folder for the PNGs (default: .)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the label colours in the overlay, 0..1 (default 0.5)")
    p.add_argument("--json", action="store_true",
                   help="print per-class pixel fractions and the files written as JSON")
    p.add_argument("--output", help="output blob (default: the net's last)")
    add_model_arguments(p, labels_help="class names, one per line, for --json",
                        image_size_help="resize to H[,W] (default: the net's input size)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import segment
    from ..device import select_device
    from ..errors import ProtonetError
    from .classify import model_from_args

    if not 0 <= args.alpha <= 1:
        raise ProtonetError(f"--alpha must be between 0 and 1, got {args.alpha}")
    model = model_from_args(args)
    if args.output:
        model.output = args.output
    if args.image_size:         # segment feeds the whole resized image, no crop
        model.preprocess = type(model.preprocess)(
            image_size=None, crop=model.preprocess.image_size, mean=model.preprocess.mean,
            scale=model.preprocess.scale, channel_order=model.preprocess.channel_order)
    stems: dict[str, int] = {}
    report = []
    for result in segment.segment(model, args.images, device=select_device(args.gpu)):
        stem = Path(result.image).stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:
            stem = f"{stem}_{stems[stem]}"
        overlay, labels = segment.write_outputs(result, args.out, args.alpha, stem)
        fractions = result.fractions()
        if args.json:
            names = model.labels or []
            report.append({
                "image": result.image, "overlay": overlay, "labels": labels,
                "height": int(result.labels.shape[0]), "width": int(result.labels.shape[1]),
                "classes": [{"class": c, "label": names[c] if c < len(names) else None,
                             "fraction": round(f, 6)} for c, f in fractions.items()]})
        else:
            top = sorted(fractions.items(), key=lambda item: -item[1])[:5]
            print(f"{result.image}: {overlay}, {labels}  " +
                  ", ".join(f"class {c}: {f:.1%}" for c, f in top))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
