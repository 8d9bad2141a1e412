"""Training images/s of a deploy net made trainable, fed from an LMDB against the same
net fed from memory: what the data path costs a training run.

The deploy net of bench_nets.py (GoogLeNet, ResNet-50, AlexNet or LeNet) gets a loss:
its last Softmax becomes SoftmaxWithLoss on a label. Two runs of the solver (SGD,
momentum 0.9) then time `--iterations` steps after `--warmup` untimed ones:

- lmdb: a TRAIN Data layer reads JPEG records (256x256 photo-like images written by
  bench_data.py's generator, 227/224 crop, mirror, mean values) through protonet's
  decode threads, prefetch and transform, as a real run does;
- memory: Input layers whose blobs hold one random batch on the device, set once
  (no decoding, no copies): the compute alone.

It prints images/s of both, the data path's cost (1 - lmdb/memory; the goal is under
10%), and with `--precision bf16|fp16` the same in mixed precision. On a GPU machine:

    python bench/bench_train_data.py --gpu 0 --nets resnet50,googlenet --batch 64
    python bench/bench_train_data.py --gpu 0 --nets resnet50 --precision bf16

On this 2-core CPU machine use small runs (--batch 8 --iterations 5).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_data import synthetic_image  # noqa: E402
from bench_nets import ROWS  # noqa: E402
from protonet.data.datum import encoded_datum  # noqa: E402
from protonet.data.imageset import _LmdbWriter  # noqa: E402
from protonet.device import select_device, synchronize  # noqa: E402
from protonet.io.upgrade import read_net  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402
from protonet.solver import get_solver  # noqa: E402
from protonet.speed import keep_freed_memory  # noqa: E402

CROP = {"alexnet": 227, "googlenet": 224, "resnet50": 224, "lenet": 28}


def write_lmdb(path: Path, records: int, size: int, channels: int) -> None:
    rng = np.random.default_rng(0)
    with _LmdbWriter(str(path)) as writer:
        for i in range(records):
            picture = synthetic_image(rng, size)
            if channels == 1:
                picture = cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY)
            jpeg = cv2.imencode(".jpg", picture)[1].tobytes()
            writer.put(f"{i:08d}".encode(), encoded_datum(jpeg, i % 10).SerializeToString())


def train_net(key: str, batch: int, source: str | None) -> caffe_pb2.NetParameter:
    """The deploy net with a loss; fed by a Data layer on `source`, or by Input layers."""
    row = next(r for r in ROWS if r.key == key)
    net = read_net(str(row.prototxt()))
    first = net.layer[0]
    if first.type != "Input":
        raise SystemExit(f"{key}: expected the deploy net to start with an Input layer")
    shape = list(first.input_param.shape[0].dim)
    channels, crop = shape[1], CROP[key]
    data = caffe_pb2.LayerParameter(name="data", top=["data", "label"])
    if source is None:
        data.type = "Input"
        data.input_param.shape.add().dim.extend([batch, channels, crop, crop])
        data.input_param.shape.add().dim.extend([batch])
    else:
        data.type = "Data"
        data.data_param.source, data.data_param.batch_size = source, batch
        data.data_param.backend = caffe_pb2.DataParameter.LMDB
        t = data.transform_param
        t.crop_size, t.mirror = crop, True
        if channels == 3:
            t.mean_value.extend([104, 117, 123])
        t.scale = 0.017 if channels == 3 else 1 / 256
    softmax = max(i for i, layer in enumerate(net.layer) if layer.type == "Softmax")
    loss = net.layer[softmax]
    loss.type, loss.name = "SoftmaxWithLoss", "loss"
    loss.bottom.append("label")
    del loss.top[:]
    loss.top.append("loss")
    layers = [data] + list(net.layer[1:])
    del net.layer[:]
    net.layer.extend(layers)
    return net


def images_per_s(key: str, args, device: torch.device, precision: str,
                 source: str | None) -> float:
    solver_param = caffe_pb2.SolverParameter(
        base_lr=0.001, momentum=0.9, lr_policy="fixed", max_iter=10 ** 6, display=0,
        random_seed=1, snapshot_after_train=False, test_initialization=False)
    solver_param.net_param.CopyFrom(train_net(key, args.batch, source))
    solver = get_solver(solver_param, device, precision=precision, source=key)
    if source is None:              # one random batch, on the device, set once
        gen = torch.Generator().manual_seed(0)
        blobs = solver.net.blobs
        blobs["data"].data = torch.rand(tuple(blobs["data"].shape), generator=gen).numpy()
        blobs["label"].data = torch.randint(0, 10, tuple(blobs["label"].shape),
                                            generator=gen).float().numpy()
    solver.step(args.warmup)
    synchronize(device)
    start = time.perf_counter()
    solver.step(args.iterations)
    synchronize(device)
    return args.iterations * args.batch / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="resnet50,googlenet")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--gpu", help="GPU id (default: the CPU)")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16")
    parser.add_argument("--workdir", help="keep the LMDBs here (default: a temp folder)")
    args = parser.parse_args(argv)
    device = select_device(args.gpu)
    if device.type == "cpu":
        keep_freed_memory()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; batch {args.batch}, {args.iterations} timed "
          f"iterations after {args.warmup}; {args.precision}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for key in args.nets.split(","):
            channels = 1 if key == "lenet" else 3
            source = folder / f"jpeg_{channels}ch_lmdb"
            if not source.exists():
                write_lmdb(source, args.records, 32 if key == "lenet" else 256, channels)
            memory = images_per_s(key, args, device, args.precision, None)
            lmdb_rate = images_per_s(key, args, device, args.precision, str(source))
            print(f"  {key:10s} memory {memory:8.1f} img/s   lmdb {lmdb_rate:8.1f} img/s   "
                  f"data path costs {100 * (1 - lmdb_rate / memory):5.1f}%")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
