"""`protonet device-query`: what torch sees (CUDA devices, CPU threads), like caffe's."""
from __future__ import annotations

import logging

log = logging.getLogger("protonet")


def register(sub) -> None:
    p = sub.add_parser("device-query", help="show the devices protonet can run on")
    p.add_argument("--gpu", help="only this GPU id")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    log.info("torch %s, CPU threads: %d", torch.__version__, torch.get_num_threads())
    if not torch.cuda.is_available():
        log.info("CUDA: not available; protonet runs on the CPU")
        return 0
    ids = range(torch.cuda.device_count())
    if args.gpu is not None:
        ids = [int(args.gpu)]
    for i in ids:
        p = torch.cuda.get_device_properties(i)
        log.info("Device id:                     %d", i)
        log.info("Name:                          %s", p.name)
        log.info("Major revision number:         %d", p.major)
        log.info("Minor revision number:         %d", p.minor)
        log.info("Total global memory:           %d", p.total_memory)
        log.info("Number of multiprocessors:     %d", p.multi_processor_count)
    return 0
