"""Throughput of the Data layer: decode + transform images/s, with and without prefetch.

Why: the data layer must keep the device busy. This generates an LMDB of
ImageNet-like records (JPEG-encoded or raw, 256x256 by default), reads it through a
TRAIN-phase Data layer (crop 227, mirror, mean values, scale) and reports images/s
for synchronous loading on one thread, synchronous loading on the decode pool, and
background prefetching. With --compute-ms the loop also sleeps that long per batch,
standing in for the net's forward/backward: prefetching hides loading behind it.

    python bench/bench_data.py [--records 256] [--batch 64] [--batches 16] [--raw]
                               [--compute-ms 200] [--workers N] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import cv2
import lmdb
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import protonet  # noqa: E402
from protonet.data import layers as data_layers  # noqa: E402
from protonet.data.datum import encoded_datum, raw_datum  # noqa: E402
from protonet.data.prefetch import default_workers  # noqa: E402
from protonet.io.text import parse_text  # noqa: E402


def synthetic_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth gradients plus noise: compresses and decodes like a photo, not like noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    phase = rng.uniform(0, 6.28, 3)
    channels = [127 + 100 * np.sin(6 * x + 4 * y + p) for p in phase]
    noisy = np.stack(channels, -1) + rng.normal(0, 12, (size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def make_lmdb(path: str, records: int, size: int, raw: bool) -> None:
    rng = np.random.default_rng(0)
    env = lmdb.open(path, map_size=1 << 32)
    with env.begin(write=True) as txn:
        for i in range(records):
            picture = synthetic_image(rng, size)
            if raw:
                datum = raw_datum(picture, i % 1000)
            else:
                datum = encoded_datum(cv2.imencode(".jpg", picture)[1].tobytes(), i % 1000)
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()


def data_net(source: str, batch: int, device: str, **options) -> protonet.Net:
    text = f'''layer {{ name: "data" type: "Data" top: "data" top: "label"
        transform_param {{ crop_size: 227 mirror: true scale: 0.017
                           mean_value: 104 mean_value: 117 mean_value: 123 }}
        data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}'''
    net = protonet.Net(parse_text(text, protonet.caffe_pb2.NetParameter()), protonet.TRAIN,
                       device=device)
    data_layers.configure_data_layers(net, **options)
    return net


def measure(source: str, args, **options) -> float:
    """Images/s over args.batches batches, after one warm-up batch."""
    net = data_net(source, args.batch, args.device, **options)
    layer = net.module.layers[0]
    layer()                                     # warm-up: opens the DB, starts threads
    start = time.perf_counter()
    for _ in range(args.batches):
        data, _ = layer()
        if data.is_cuda:
            torch.cuda.synchronize()
        time.sleep(args.compute_ms / 1000)
    elapsed = time.perf_counter() - start
    layer.close()
    return args.batches * args.batch / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="stored image side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--raw", action="store_true", help="raw pixels instead of JPEG")
    parser.add_argument("--compute-ms", type=float, default=0.0,
                        help="simulated net time per batch")
    parser.add_argument("--workers", type=int, default=None, help="decode threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    workers = args.workers or default_workers()
    kind = "raw" if args.raw else "JPEG"
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "bench_lmdb")
        make_lmdb(source, args.records, args.size, args.raw)
        print(f"{args.records} {kind} records {args.size}x{args.size}, batch {args.batch}, "
              f"crop 227 + mirror + mean + scale, device {args.device}, "
              f"{os.cpu_count()} CPUs, simulated compute {args.compute_ms:g} ms/batch")
        runs = [("no prefetch, 1 thread", dict(prefetch=False, workers=0)),
                (f"no prefetch, {workers} decode threads", dict(prefetch=False,
                                                                workers=workers)),
                (f"prefetch, {workers} decode threads", dict(prefetch=True,
                                                             workers=workers))]
        for label, options in runs:
            print(f"  {label:34s} {measure(source, args, **options):8.0f} images/s")


if __name__ == "__main__":
    main()
