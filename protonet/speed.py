"""Opt-in fast paths: an inference plan, channels-last layout, half precision, compile.

A NetModule's own forward is Caffe-exact and keeps every blob. Deployment wants less:
the outputs of a TEST-phase forward, as fast as possible. `InferenceNet` (made by
`NetModule.optimize_for_inference()`) is a frozen plan for that:

- it runs under torch.inference_mode, calling layers directly (no autograd, no hooks);
  Split layers become aliases (their tops are views anyway);
- BatchNorm with global statistics and a following per-channel Scale become one affine
  map, folded into the preceding Convolution's weights when there is one (ResNet's
  conv -> BN -> Scale is then one convolution); results stay within float32 rounding;
- on CPU, convolution and inner-product weights are reordered once into oneDNN's
  blocked layout (eager torch reorders them on every call, which dominates batch-1
  ResNet), and a ReLU right after a convolution, inner product or Eltwise SUM runs
  fused with it; where no blob need be kept, a convolution whose top only an
  Eltwise SUM reads adds the sum's other bottom in the same kernel (ResNet's shortcut
  joins), writing into that bottom's memory when nothing reads it later;
- channels-last (NHWC) activations let oneDNN convolve without reordering and make
  torch's CPU pooling vectorize over channels; values are unchanged up to summation
  order;
- precision "bf16"/"fp16" keeps a low-precision copy of every convolution and inner
  product weight (cast once, not on each call as autocast would) and runs them on
  low-precision activations; layers with numerically delicate arithmetic (Softmax,
  losses, unfolded normalization) get float32 bottoms, LRN normalizes in float32, and
  the outputs come back as float32;
- `compile=True` hands the plan (unpacked weights) to torch.compile (Inductor, with
  weight freezing) and falls back to the eager plan, with a warning, if compilation
  fails. On the 2-core AVX-512 machine it was measured on it did not pay: 20 s to
  compile LeNet, and slower than the eager plan (AlexNet fp32 3x slower: Inductor's
  fp32 linear is not oneDNN's).

The plan snapshots the weights it folds or casts: build a new one after changing them.
For training-style runs (forward + backward), `autocast` and `to_channels_last` give
the same precision and layout choices on the module itself.

`keep_freed_memory()` is the CPU counterpart of Caffe allocating its blobs once: glibc
hands big tensors back to the kernel on free (munmap) and page-faults fresh zeroed
pages on the next allocation, which costs more than the arithmetic for large fully
connected layers (a 151 MB weight gradient: ~50 ms of page faults for ~15 ms of
GEMM). Serving them from the heap and not trimming it makes every iteration after the
first reuse warm memory; the process keeps its peak footprint.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import platform
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .errors import NetError, ProtonetError
from .proto import caffe_pb2

log = logging.getLogger("protonet")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Layers that compute fine on bf16/fp16 activations (moving, max-ing, adding, or
# normalizing internally in float32); every other layer gets float32 bottoms.
LOW_PRECISION_SAFE = {"ReLU", "Pooling", "Split", "Concat", "Flatten", "Reshape", "Dropout",
                      "Eltwise", "LRN", "Slice", "Crop", "Silence"}


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4     # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed tensor memory for reuse (see above); False where
    the C library is not glibc or refuses. Process-wide: for benchmarks and servers."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def precision_dtype(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ProtonetError(f"--precision expects one of {', '.join(PRECISIONS)}; "
                            f"got '{precision}'") from None


def to_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """A 4-axis floating tensor in NHWC memory order (same shape and values).

    A contiguous 1-channel tensor already is NHWC in memory, but its strides read as
    NCHW too, and torch then keeps the next convolution's top NCHW (LeNet's conv1, and
    everything after it); a view with NHWC strides makes the layout unambiguous."""
    if tensor.dim() != 4 or not tensor.is_floating_point():
        return tensor
    n, c, h, w = tensor.shape
    if c == 1 and tensor.is_contiguous():
        return tensor.as_strided(tensor.shape, (h * w, 1, w, 1))
    return tensor.contiguous(memory_format=torch.channels_last)


def autocast(precision: str, device: torch.device):
    """torch.autocast for bf16/fp16 (conv and matmul in low precision), or nothing."""
    dtype = precision_dtype(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if torch.device(device).type == "cpu":
        warn_if_emulated(dtype)
    return torch.autocast(torch.device(device).type, dtype=dtype)


@dataclass
class _Op:
    """One step of the plan: run(*bottoms) -> top or tops, wired by blob ids."""
    run: Callable
    bottoms: tuple[int, ...]
    tops: tuple[int, ...]
    name: str
    type: str
    bottom_dtype: torch.dtype | None = None    # cast floating bottoms to this first


class InferenceNet:
    """A frozen inference plan of a NetModule; call it with {input name: tensor}."""

    def __init__(self, module, precision: str = "fp32", channels_last: bool | None = None,
                 compile: bool = False, fold: bool = True, keep_blobs: bool = False,
                 deferrable: bool = False):
        if keep_blobs and (precision != "fp32" or compile):
            raise ProtonetError("an inference plan that keeps every blob runs fp32, eagerly")
        self.module = module
        self.keep_blobs = keep_blobs
        self.dtype = precision_dtype(precision)
        self.precision = precision
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if device.type == "cpu" and self.dtype != torch.float32:
            warn_if_emulated(self.dtype)
        self.channels_last = device.type == "cpu" if channels_last is None else channels_last
        self.output_ids = list(module.output_ids)
        self.output_names = [module.blob_names[i] for i in self.output_ids]
        self.num_blobs = len(module.blob_names)
        with torch.no_grad():
            # Inductor packs weights itself (and cannot trace oneDNN's packed tensors).
            planner = _Planner(module, self.dtype, fold, device, pack=not compile,
                               channels_last=self.channels_last, exact_blobs=keep_blobs,
                               deferrable=deferrable)
            self.ops = planner.plan()
        self.output_blobs = [planner.resolve(i) for i in self.output_ids]
        # {blob: (op making it alone, its bottom)}: blobs a joined op skips
        self.deferred = {blob: (run, planner.resolve(bottom))
                         for blob, (run, bottom) in planner.deferred.items()}
        self.aliases = sorted(planner.alias.items())     # Split tops: views of a blob
        # Each layer's own dict of params (what blobs[i] = p replaces), read without
        # nn.Module's attribute and ParameterList's index machinery: stale() runs on
        # every Net.forward (ResNet-50: 0.82 ms a call that way, 0.05 ms this way).
        self._param_dicts = [layer.blobs._parameters for layer in module.layers]
        self._versions = _param_versions(self._param_dicts)
        self.folded = sum(1 for s in module.steps if not s.is_input) - len(self.ops)
        self._compiled = _compile(self._run) if compile else None

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            if self._compiled is not None:
                try:
                    return self._compiled(dict(inputs))
                except Exception as e:    # noqa: BLE001 - any compiler failure falls back
                    log.warning("torch.compile failed (%s: %s); running the eager plan",
                                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                    self._compiled = None
            return self._run(dict(inputs))

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def stale(self) -> bool:
        """Whether a param was changed in place (or replaced) since the plan was made:
        it folded and packed their values then, so it must be made again."""
        return _param_versions(self._param_dicts) != self._versions

    def forward_blobs(self, inputs: Mapping[str, torch.Tensor],
                      pending: dict | None = None) -> tuple[list, torch.Tensor | None]:
        """NetModule.forward's result — every blob's value by id, and the weighted loss —
        from a plan made with keep_blobs=True: it folds and fuses only chains of layers
        in place on one blob (conv -> BatchNorm -> Scale -> ReLU, Eltwise SUM -> ReLU),
        whose intermediate values Caffe's own forward overwrites too, so each blob holds
        what Caffe's forward leaves in it. A plan made `deferrable` also joins a
        shortcut sum into the convolution before it (see _Planner._sum_joining); the
        convolution's own top is then made on demand: `pending` gets {blob id: a
        function returning its value} (without `pending`, it is made here). Runs under
        no_grad (its tensors stay usable for later autograd-free edits), not
        inference_mode."""
        if not self.keep_blobs:
            raise ProtonetError("forward_blobs needs a plan made with keep_blobs=True")
        with torch.no_grad():
            values = self._values(dict(inputs))
            for blob, (run, bottom) in self.deferred.items():
                make = _deferred(run, values[bottom])
                if pending is None:
                    values[blob] = make()
                else:
                    pending[blob] = make
        for top, source in self.aliases:
            if values[top] is None:
                values[top] = values[source]
        loss = None
        for step in self.module.steps:
            for pos, weight in step.losses:
                term = values[step.tops[pos]].sum() * weight
                loss = term if loss is None else loss + term
        return values, loss

    def _run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = self._values(inputs)
        return {name: _as_output(values[i]) for name, i in zip(self.output_names,
                                                                self.output_blobs)}

    def _values(self, inputs: dict[str, torch.Tensor]) -> list:
        values: list = [None] * self.num_blobs
        index = self.module.blob_index
        for name, tensor in inputs.items():
            values[index[name]] = to_channels_last(tensor) if self.channels_last else tensor
        for op in self.ops:
            bottoms = [values[b] for b in op.bottoms]
            if op.bottom_dtype is not None:
                bottoms = [b.to(op.bottom_dtype) if b.is_floating_point() else b
                           for b in bottoms]
            try:
                out = op.run(*bottoms)
            except (RuntimeError, ValueError, IndexError) as e:
                shapes = [list(b.shape) for b in bottoms]
                raise NetError(f"inference plan: forward failed for bottoms {shapes}: "
                               f"{type(e).__name__}: {e}", op.name, op.type) from e
            if isinstance(out, torch.Tensor):
                values[op.tops[0]] = out
            else:
                for t, v in zip(op.tops, out):
                    values[t] = v
        return values


def _deferred(run: Callable, bottom: torch.Tensor) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        with torch.no_grad():
            return run(bottom)
    return make


def _param_versions(param_dicts) -> list:
    return [(id(p), p._version) for params in param_dicts for p in params.values()]


def _as_output(tensor):
    if tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.float().contiguous()


# -- building the plan ---------------------------------------------------------------
class _Planner:
    """Walks the module's steps once, folding, fusing and packing as it goes."""

    def __init__(self, module, dtype: torch.dtype, fold: bool, device: torch.device,
                 pack: bool = True, channels_last: bool = False, exact_blobs: bool = False,
                 deferrable: bool = False):
        self.module = module
        self.exact = exact_blobs        # fuse only steps in place on one blob...
        self.deferrable = deferrable    # ...or join sums, their skipped tops deferred
        self.deferred: dict[int, tuple[Callable, int]] = {}
        self.steps = [s for s in module.steps if not s.is_input]
        self.dtype = dtype
        self.low = dtype != torch.float32
        self.fold = fold
        self.pack = pack and device.type == "cpu" and _mkldnn_ops_available() and \
            mkldnn_supports(dtype)
        self.channels_last = channels_last

    def plan(self) -> list[_Op]:
        """The ops; Split tops become aliases of their bottom (views need no op)."""
        ops, i = [], 0
        self.alias: dict[int, int] = {}
        while i < len(self.steps):
            step = self.steps[i]
            if self.module.layers[step.layer].type == "Split" and len(step.bottoms) == 1:
                for top in step.tops:
                    self.alias[top] = self.resolve(step.bottoms[0])
                i += 1
                continue
            op, used = self._op_at(i)
            op.bottoms = tuple(self.resolve(b) for b in op.bottoms)
            for top in op.tops:                # a top written anew is its own blob again
                self.alias.pop(top, None)
            ops.append(op)
            i += used
        return ops

    def resolve(self, blob: int) -> int:
        return self.alias.get(blob, blob)

    def _op_at(self, i: int) -> tuple[_Op, int]:
        step = self.steps[i]
        layer = self.module.layers[step.layer]
        name = self.module.layer_names[step.layer]
        if layer.type in ("Convolution", "InnerProduct") and len(step.bottoms) == 1:
            affine, used = self._affine_at(i + 1, step.tops, after=True) if \
                layer.type == "Convolution" and layer.axis == 1 else (None, 0)
            tops = self.steps[i + used].tops
            joined = self._sum_joining(i + 1 + used, tops[0], step.bottoms[0]) if \
                layer.type == "Convolution" else None
            if joined is not None:
                other, sum_step, into = joined
                relu = self._is_relu_on(sum_step + 1, self.steps[sum_step].tops)
                run = self._weighted(layer, step.bottoms[0], affine, relu,
                                     add="into" if into and not self.exact else "new")
                if run is not None and self.exact:
                    self.deferred[tops[0]] = (run.alone, step.bottoms[0])
                if run is not None:
                    return _Op(run, (step.bottoms[0], other),
                               self.steps[sum_step + relu].tops, name, "Convolution"), \
                        sum_step + 1 + relu - i
            relu = self._is_relu_on(i + 1 + used, tops)
            if relu:
                tops = self.steps[i + 1 + used].tops
            run = self._weighted(layer, step.bottoms[0], affine, relu)
            return _Op(run, step.bottoms, tops, name, layer.type), 1 + used + relu
        if self._is_plain_sum(layer) and self._is_relu_on(i + 1, step.tops):
            return _Op(_sum_relu, step.bottoms, self.steps[i + 1].tops, name,
                       layer.type), 2
        affine, used = self._affine_at(i, step.bottoms)
        if affine is not None:
            return _Op(_affine_op(*affine), step.bottoms, self.steps[i + used - 1].tops, name,
                       "BatchNorm", torch.float32 if self.low else None), used
        if layer.type == "Deconvolution" and self.low and len(step.bottoms) == 1:
            return _Op(self._weighted(layer, step.bottoms[0], None, False), step.bottoms,
                       step.tops, name, layer.type), 1
        cast = torch.float32 if self.low and layer.type not in LOW_PRECISION_SAFE else None
        return _Op(layer.forward, step.bottoms, step.tops, name, layer.type, cast), 1

    @staticmethod
    def _is_plain_sum(layer) -> bool:
        return layer.type == "Eltwise" and \
            layer.operation == caffe_pb2.EltwiseParameter.SUM and \
            all(c == 1 for c in layer.coeffs)

    def _sum_joining(self, i: int, blob: int, source: int) -> tuple[int, int, bool] | None:
        """(the other bottom, step index, whether the sum may overwrite it) when step i
        is a plain two-bottom Eltwise SUM reading `blob` and nothing else reads `blob`
        nor is it a net output: the convolution making `blob` from `source` can add the
        other bottom in its own kernel (ResNet's shortcut joins). Only where blobs need
        not be kept, or (deferrable) where `blob` can be made later on demand. Writing
        the sum into the other bottom's memory, where no later step nor the caller
        reads it and the convolution does not read it either, saves a fresh output
        (~1/3 of the time of a ResNet 1x1 join on 2 cores: the new memory is cold)."""
        if (self.exact and not self.deferrable) or not self.pack or i >= len(self.steps):
            return None
        step = self.steps[i]
        layer = self.module.layers[step.layer]
        if not self._is_plain_sum(layer) or len(step.bottoms) != 2 or \
                step.bottoms.count(blob) != 1 or blob in self.module.output_ids:
            return None
        readers = sum(b == blob for s in self.steps for b in s.bottoms)
        if readers != self._reads_until(i, blob):
            return None
        other = step.bottoms[1] if step.bottoms[0] == blob else step.bottoms[0]
        if self.module.blob_shapes[other] != self.module.blob_shapes[blob]:
            return None
        roots = self._split_roots()
        into = roots.get(other, other) != roots.get(source, source) and \
            self._free_after(i, other)
        return other, i, into

    def _free_after(self, i: int, blob: int) -> bool:
        """Nothing reads `blob`'s memory after step i: no later step reads it or a Split
        top sharing it, it is no net output, and it is not an input the caller gave."""
        roots = self._split_roots()
        root = roots.get(blob, blob)
        if root in self.module.input_ids or \
                any(roots.get(b, b) == root for b in self.module.output_ids):
            return False
        return not any(roots.get(b, b) == root for s in self.steps[i + 1:] for b in s.bottoms)

    def _split_roots(self) -> dict[int, int]:
        """{Split top: the blob whose memory it shares}."""
        if not hasattr(self, "_roots"):
            self._roots = {}
            for step in self.steps:
                if self.module.layers[step.layer].type == "Split" and len(step.bottoms) == 1:
                    source = self._roots.get(step.bottoms[0], step.bottoms[0])
                    self._roots.update({top: source for top in step.tops})
        return self._roots

    def _reads_until(self, i: int, blob: int) -> int:
        """How many times steps up to i read `blob` from its making convolution on: the
        folded BatchNorm/Scale in place on it, and the Eltwise at i."""
        count = 0
        for k in range(i, -1, -1):
            count += sum(b == blob for b in self.steps[k].bottoms)
            if blob in self.steps[k].tops and blob not in self.steps[k].bottoms:
                break
        return count

    def _is_relu_on(self, i: int, blobs: tuple[int, ...]) -> bool:
        if i >= len(self.steps):
            return False
        step = self.steps[i]
        layer = self.module.layers[step.layer]
        return layer.type == "ReLU" and step.bottoms == blobs and \
            layer.param.relu_param.negative_slope == 0 and \
            (not self.exact or step.tops == blobs)

    def _affine_at(self, i: int, blobs: tuple[int, ...], after: bool = False):
        """A per-channel affine map (scale, shift), in float64, from a BatchNorm with
        global statistics at step i reading `blobs`, and a per-channel Scale after it;
        with the number of steps it covers. (None, 0) when the steps are not so.
        `after`: it would fold into the layer making `blobs` (exact_blobs then needs
        the BatchNorm in place on them)."""
        if not self.fold or i >= len(self.steps) or len(blobs) != 1:
            return None, 0
        step = self.steps[i]
        layer = self.module.layers[step.layer]
        if layer.type != "BatchNorm" or step.bottoms != blobs or not layer.use_global_stats:
            return None, 0
        if self.exact and after and step.tops != blobs:
            return None, 0
        mean_sum, var_sum, factor = (b.detach().double() for b in layer.blobs)
        inverse = torch.where(factor == 0, torch.zeros_like(factor), 1 / factor)
        std = torch.sqrt(var_sum * inverse + layer.param.batch_norm_param.eps)
        scale, shift = 1 / std, -(mean_sum * inverse) / std
        if i + 1 < len(self.steps):
            nxt = self.steps[i + 1]
            scale_layer = self.module.layers[nxt.layer]
            if scale_layer.type == "Scale" and nxt.bottoms == step.tops and \
                    (not self.exact or nxt.tops == step.tops) and \
                    scale_layer.per_channel_of(self.module.blob_shapes[step.tops[0]]):
                gamma = scale_layer.blobs[0].detach().double()
                scale, shift = scale * gamma, shift * gamma
                if scale_layer.param.scale_param.bias_term:
                    shift = shift + scale_layer.blobs[1].detach().double()
                return (scale, shift), 2
        return (scale, shift), 1

    def _weighted(self, layer, bottom: int, affine, relu: bool,
                  add: str | None = None) -> Callable | None:
        """Convolution/InnerProduct with folded, cast (and on CPU, prepacked) weights.
        `add` ("new", or "into" that tensor's memory): a 2-D convolution taking a second
        tensor to add to its output (before the ReLU) in the same kernel; None where it
        cannot."""
        weight = layer.blobs[0].detach().contiguous()
        bias = layer.blobs[1].detach() if layer.bias_term else None
        if affine is not None:
            scale, shift = affine
            view = (-1,) + (1,) * (weight.dim() - 1)
            weight = (weight.double() * scale.reshape(view)).float()
            base = bias.double() if bias is not None else torch.zeros_like(shift)
            bias = (base * scale + shift).float()
        weight = weight.to(self.dtype)
        bias = bias.to(self.dtype) if bias is not None else None
        shape = self.module.blob_shapes[bottom]
        if layer.type == "InnerProduct":
            if layer.transpose:
                weight = weight.t().contiguous()
            return _linear(layer, weight, bias, relu, self.dtype, self.pack)
        if layer.type == "Convolution" and layer.geometry.n == 2 and len(shape) == 4:
            return _conv2d(layer, weight, bias, relu, self.dtype, self.pack, shape,
                           self.channels_last, add)
        if add:
            return None
        activation = torch.relu if relu else _identity

        def run(x):
            return activation(layer.convolve(x.to(self.dtype), weight, bias))
        return run


def _identity(x):
    return x


def _sum_relu(*bottoms):
    """Eltwise SUM then ReLU (ResNet's shortcut join), the ReLU in place on the sum."""
    total = bottoms[0] + bottoms[1]
    for bottom in bottoms[2:]:
        total += bottom
    return total.relu_()


def _to_channels_last_4d(y):
    return y if y.is_contiguous(memory_format=torch.channels_last) else \
        y.contiguous(memory_format=torch.channels_last)


def _mkldnn_ops_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and \
        hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight") and all(
            hasattr(ops, name) for name in ("_convolution_pointwise", "_linear_pointwise",
                                            "_reorder_linear_weight"))


def mkldnn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed kernels take `dtype` on this CPU. Its fp16 kernels need
    AVX-512 FP16 or AVX-NE-CONVERT (bf16-only AVX-512 CPUs refuse them at the first
    call); without, the plan keeps plain weights, which torch's own kernels run."""
    check = {torch.float16: "_is_mkldnn_fp16_supported",
             torch.bfloat16: "_is_mkldnn_bf16_supported"}.get(dtype)
    if check is None:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


_warned: set = set()


def warn_if_emulated(dtype: torch.dtype) -> None:
    """Say once per process when this CPU has no native kernels for `dtype`: the
    results stay right, but it runs slower than float32."""
    if dtype in _warned or mkldnn_supports(dtype):
        return
    _warned.add(dtype)
    need = "AVX-512 FP16 or AVX-NE-CONVERT" if dtype == torch.float16 else "AVX-512 BF16"
    log.warning("this CPU has no %s: %s runs on torch's generic kernels, correct but "
                "slower than fp32", need, {torch.float16: "fp16"}.get(dtype, "bf16"))


def _conv2d(layer, weight, bias, relu: bool, dtype, pack: bool, shape,
            channels_last: bool, add: str | None = None) -> Callable | None:
    """A 2-D convolution; on CPU with oneDNN, its weight reordered once into the blocked
    layout oneDNN wants (not on every call) and ReLU fused into the same kernel.
    `add`: run(x, other) adds `other` to the output in the kernel too (oneDNN's binary
    post-op, before the ReLU: one pass over the sum instead of three), into `other`'s
    own memory for "into"; None without packed fp32 weights. The "new" run carries
    `.alone`: the convolution by itself (no sum, no ReLU) on the same packed weight,
    to make its own top on demand."""
    g = layer.geometry
    pad, stride, dilation = list(g.pad), list(g.stride), list(g.dilation)
    # A 1-channel bottom (LeNet's data) reads as NCHW, and so would the top.
    _layout = _to_channels_last_4d if channels_last else _identity
    if pack:
        try:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), pad, stride, dilation, layer.group, list(shape))
        except RuntimeError:
            pack = False
    if add and (not pack or dtype != torch.float32):    # torch's bf16/fp16 fallback
        return None                                     # has no add + ReLU
    if add:
        unary = "relu" if relu else None
        if add == "into":
            join_into = torch.ops.mkldnn._convolution_pointwise_.binary

            def run_add(x, other):
                return join_into(_layout(other), x, packed, bias, pad, stride, dilation,
                                 layer.group, "add", 1.0, unary, [], "")
            return run_add
        join = torch.ops.mkldnn._convolution_pointwise.binary
        convolve = torch.ops.mkldnn._convolution_pointwise

        def run_add(x, other):
            return _layout(join(x.to(dtype), _layout(other.to(dtype)), packed, bias, pad,
                                stride, dilation, layer.group, "add", 1.0, unary, [], ""))

        def alone(x):
            return _layout(convolve(x.to(dtype), packed, bias, pad, stride, dilation,
                                    layer.group, "none", [], ""))
        run_add.alone = alone
        return run_add
    if pack:
        attr = "relu" if relu else "none"
        convolve = torch.ops.mkldnn._convolution_pointwise

        def run(x):
            return _layout(convolve(x.to(dtype), packed, bias, pad, stride, dilation,
                                    layer.group, attr, [], ""))
    else:
        weight = weight.contiguous(memory_format=torch.channels_last)
        activation = torch.relu if relu else _identity

        def run(x):
            return _layout(activation(torch.nn.functional.conv2d(
                x.to(dtype), weight, bias, stride, pad, dilation, layer.group)))
    return run


def _linear(layer, weight, bias, relu: bool, dtype, pack: bool) -> Callable:
    """An inner product on a [num_output, K] weight; oneDNN with a prepacked weight on CPU
    (for fp32 also much faster than the BLAS GEMM at small batch)."""
    axis, k = layer.axis, layer.k
    if pack:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        attr = "relu" if relu else "none"
        product = torch.ops.mkldnn._linear_pointwise

        def multiply(flat):
            return product(flat, packed, bias, attr, [], "")
    else:
        activation = torch.relu if relu else _identity

        def multiply(flat):
            return activation(torch.nn.functional.linear(flat, weight, bias))

    def run(x):
        lead = x.shape[:axis]
        y = multiply(x.to(dtype).reshape(-1, k))
        return y.reshape(tuple(lead) + (y.shape[1],))
    return run


def _affine_op(scale: torch.Tensor, shift: torch.Tensor) -> Callable:
    scale, shift = scale.float(), shift.float()

    def affine(x):
        view = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.to(x.device).reshape(view), x,
                             scale.to(x.device).reshape(view))
    return affine


# -- compile ---------------------------------------------------------------------------
def _compile(fn: Callable) -> Callable | None:
    """torch.compile(fn) with Inductor's weight freezing, or None when unavailable."""
    try:
        return torch.compile(fn, dynamic=False, options={"freezing": True})
    except Exception as e:    # noqa: BLE001 - no compiler stack: run eagerly
        log.warning("torch.compile is unavailable (%s); running the eager plan", e)
        return None
