"""Choosing the torch device from Caffe-style flags (--gpu 0 | 1,2 | all)."""
from __future__ import annotations

import logging

import torch

from .errors import ProtonetError

log = logging.getLogger("protonet")


def parse_gpus(flag: str | None) -> list[int]:
    """Device ids named by --gpu; [] for CPU. 'all' means every visible GPU."""
    if flag is None or flag == "":
        return []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if flag == "all":
        return list(range(count))
    try:
        ids = [int(x) for x in flag.split(",") if x.strip() != ""]
    except ValueError:
        raise ProtonetError(f"--gpu expects 'all' or device ids like 0 or 0,1; got '{flag}'") \
            from None
    if any(i < 0 for i in ids):
        return []          # Caffe's -1 means CPU
    return ids


def select_device(flag: str | None) -> torch.device:
    """The first device --gpu names, or the CPU (with a warning when CUDA is absent)."""
    ids = parse_gpus(flag)
    if not ids:
        if flag not in (None, "", "all") and not flag.startswith("-"):
            log.warning("--gpu %s asked for, but CUDA is not available; using the CPU", flag)
        elif flag == "all" and not torch.cuda.is_available():
            log.warning("--gpu all: no CUDA device is available; using the CPU")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("--gpu %s asked for, but CUDA is not available; using the CPU", flag)
        return torch.device("cpu")
    if ids[0] >= torch.cuda.device_count():
        raise ProtonetError(f"--gpu {ids[0]}: only {torch.cuda.device_count()} CUDA "
                            "device(s) visible")
    configure_cuda()
    return torch.device("cuda", ids[0])


def configure_cuda() -> None:
    """cuDNN and cuBLAS settings for a CUDA run: convolution algorithms autotuned per
    shape (a Caffe net's shapes are fixed, so the first iteration's search pays for
    itself), and no TF32, so float32 stays float32, the numerics Caffe's results are
    compared in; reduced precision is asked for with --precision bf16|fp16."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
