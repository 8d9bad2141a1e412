"""Throughput and latency of `protonet serve`, with and without dynamic batching.

Why: batching is what a server adds over `protonet classify` in a loop; this shows
what it buys. Three server processes run the same model — two batching requests (up
to --max-batch images, one waiting up to --max-wait-ms for others, one waiting 0 ms:
only requests that queued during the last pass join it), one running each image alone
(--max-batch 1) — and closed-loop clients (each sends its next request when the last
one is answered, over a kept-alive connection) post JPEGs to each in turn, at 1, 8
and 32 concurrent clients, the servers taking turns (--rounds times at each
level, so a noisy machine hits them alike). Printed per row: the median requests/s of
the rounds (and their range), p50 and p99 latency over all of them, and the mean
images per forward pass the server reports.

    python bench/bench_serve.py [--model open_nsfw|small|NET] [--clients 1,8,32]
                                [--requests 64] [--rounds 3] [--max-batch 8]
                                [--max-wait-ms 5] [serve flags ...]

Flags it does not know (--weights, --cache-dir, --gpu, --precision, ...) go to
`protonet serve`. The servers share the machine's cores with the clients.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# --model small: a random-weight convnet on 64x64 images, where a forward pass costs
# little next to a request's fixed costs, the case batching is for on a CPU.
SMALL = """
name: "small"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 3 dim: 64 dim: 64 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 16 kernel_size: 3 stride: 2
                            weight_filler { type: "msra" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 32 kernel_size: 3 stride: 2
                            weight_filler { type: "msra" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def small_model(folder: str) -> list[str]:
    """Serve flags for the small net, written with random weights into `folder`."""
    sys.path.insert(0, str(ROOT))
    import protonet
    deploy, weights = os.path.join(folder, "small.prototxt"), \
        os.path.join(folder, "small.caffemodel")
    with open(deploy, "w") as f:
        f.write(SMALL)
    protonet.set_random_seed(0)
    protonet.Net(deploy, protonet.TEST).save(weights)
    return ["--model", deploy, "--weights", weights, "--image-size", "64",
            "--scale", "0.00390625"]


def spawn(argv: list[str]) -> subprocess.Popen:
    """A `protonet serve` process on a free port (see `ready`)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.Popen([sys.executable, "-m", "protonet", "-q", "serve", "--port", "0",
                             *argv], stdout=subprocess.PIPE, text=True, env=env)


def ready(proc: subprocess.Popen) -> tuple[subprocess.Popen, str, int]:
    """(process, host, port) once the server prints its URL."""
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.wait()
        raise SystemExit(f"protonet serve {' '.join(proc.args[5:])} did not start")
    host, port = url[len("http://"):].rsplit(":", 1)
    return proc, host, int(port)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def images(count: int = 8) -> list[bytes]:
    """Photo-like JPEGs of a few sizes (the conformance images when present)."""
    folder = Path(os.environ.get("PROTONET_CONFORMANCE", ROOT.parent / "shared" /
                                 "conformance")) / "data" / "images"
    found = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if found:
        return [p.read_bytes() for p in found[:count]]
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        h, w = 240 + 16 * i, 320 - 8 * i
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        image = np.stack([127 + 100 * np.sin(5 * x + 3 * y + p)
                          for p in rng.uniform(0, 6, 3)], -1)
        image += rng.normal(0, 10, image.shape)
        out.append(cv2.imencode(".jpg", image.clip(0, 255).astype(np.uint8))[1].tobytes())
    return out


def get(host: str, port: int, path: str) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.request("GET", path)
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return answer


def load(host: str, port: int, bodies: list[bytes], clients: int,
         requests: int) -> list[float]:
    """`requests` POSTs from `clients` closed-loop clients; each one's latency (s)."""
    latencies: list[float] = []
    lock = threading.Lock()
    left = [requests]
    ready = threading.Barrier(clients)
    failures = []

    def client(index: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=300)
        ready.wait()
        n = index
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            body = bodies[n % len(bodies)]
            n += clients
            began = time.perf_counter()
            conn.request("POST", "/predict?k=5", body, {"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            took = time.perf_counter() - began
            if response.status != 200:
                failures.append(response.status)
            with lock:
                latencies.append(took)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed: {failures[:5]}")
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="open_nsfw",
                        help="zoo name or deploy.prototxt; 'small': a small random-weight "
                             "net written here")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=64, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns each server takes at each level (median req/s)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5)
    args, serve_flags = parser.parse_known_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    bodies = images()
    modes = {f"batched (max {args.max_batch}, {wait:g} ms)":
             ["--max-batch", str(args.max_batch), "--max-wait-ms", str(wait)]
             for wait in sorted({args.max_wait_ms, 0.0}, reverse=True)}
    modes["one image per pass"] = ["--max-batch", "1"]
    folder = tempfile.mkdtemp(prefix="bench_serve_")
    model = small_model(folder) if args.model == "small" else ["--model", args.model]
    servers = {}
    try:
        procs = {name: spawn([*model, *flags, *serve_flags]) for name, flags in modes.items()}
        servers.update({name: proc for name, proc in procs.items()})
        for name, proc in procs.items():                   # they start side by side
            servers[name] = ready(proc)
        for proc, host, port in servers.values():         # warm-up: first passes are slow
            load(host, port, bodies, 2, 4)
        print(f"model {args.model}; {args.rounds} rounds of {args.requests} requests per "
              f"row, the servers taking turns; {len(bodies)} JPEGs; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
        print(f"{'clients':>7}  {'mode':<28} {'req/s (range)':>19} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'img/pass':>8}")
        for clients in levels:
            rates = {name: [] for name in servers}
            latencies = {name: [] for name in servers}
            passes = {name: [0, 0] for name in servers}
            for _ in range(args.rounds):
                for name, (proc, host, port) in servers.items():     # A/B, taking turns
                    before = get(host, port, "/healthz")
                    began = time.perf_counter()
                    took = load(host, port, bodies, clients, args.requests)
                    rates[name].append(len(took) / (time.perf_counter() - began))
                    latencies[name] += took
                    after = get(host, port, "/healthz")
                    passes[name][0] += after["images"] - before["images"]
                    passes[name][1] += after["batches"] - before["batches"]
            for name in servers:
                ms = np.percentile(np.array(latencies[name]) * 1000, [50, 99])
                rate = f"{np.median(rates[name]):.1f} ({min(rates[name]):.1f}-" \
                       f"{max(rates[name]):.1f})"
                print(f"{clients:>7}  {name:<28} {rate:>19} {ms[0]:>8.1f} {ms[1]:>8.1f} "
                      f"{passes[name][0] / max(1, passes[name][1]):>8.2f}", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        for server in servers.values():
            stop(server[0] if isinstance(server, tuple) else server)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
