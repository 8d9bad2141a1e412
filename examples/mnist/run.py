"""Train LeNet on handwritten digits from LMDB, end to end, with one command.

    python examples/mnist/run.py [--workdir runs/mnist] [--gpu 0] [--smoke]

The steps are the ones you would type for Caffe's MNIST example, with protonet:

1. the digits that ship with scikit-learn (1797 grey 8x8 images, no download) are
   written as PNG files plus `<path> <label>` lists: 1497 for training, 300 for
   testing (a fixed shuffle, so every run splits the same way);
2. `protonet convert-imageset --gray --resize_height 28 --resize_width 28` turns
   each list into an LMDB of Caffe Datum records;
3. `protonet train --solver examples/mnist/lenet_solver.prototxt` trains the
   published LeNet on them (progress bar on a terminal; the Caffe-format log goes
   to the terminal and to <workdir>/train.log);
4. `protonet parse-log` and `protonet plot-log` turn the log into CSV tables and a
   loss/accuracy plot (the plot needs matplotlib).

Every file goes under the work directory. Paths inside the prototxts are relative
to the current directory, as in Caffe, and the published ones are written for the
repository root with the default work directory runs/mnist: that case trains with
examples/mnist/lenet_solver.prototxt as is, from the repository root. With another
--workdir, or changed iterations, the solver and net are copied into the work
directory with absolute paths (and the changes), and those copies are trained.

The steps run in this process through protonet's command line (`protonet.cli.main`),
so the commands above are exactly what runs. --smoke is a short run on a subset
(a test uses it).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:       # works from a plain clone too, not only installed
    sys.path.insert(0, str(REPO))

from protonet import cli  # noqa: E402
from protonet.io.text import read_text, write_text  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402

SOLVER = HERE / "lenet_solver.prototxt"
DEFAULT_WORKDIR = Path("runs/mnist")
TEST_SHARE = 6            # one image in six is a test image: 300 of 1797
LOG_FORMAT = "%(levelname).1s%(asctime)s.%(msecs)03d %(message)s"   # as the CLI's


# -- 1. the data set as images and lists ---------------------------------------------
def load_digits():
    """scikit-learn's bundled digits: (N, 8, 8) uint8 images in 0..255 and labels."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        sys.exit("this example reads scikit-learn's bundled digits: "
                 "pip install -e '.[example]' (or pip install scikit-learn)")
    import numpy as np
    digits = sklearn_digits()
    # 0..16 grey levels to 8-bit, rounding to the nearest level
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(int)


def split(count: int, limit: int | None) -> tuple[list[int], list[int]]:
    """A fixed shuffle of the indices, optionally cut to `limit`, then one in
    TEST_SHARE (rounded) to the test set; training keeps the shuffled order."""
    import numpy as np
    order = np.random.default_rng(0).permutation(count).tolist()
    if limit:
        order = order[:limit]
    tests = round(len(order) / TEST_SHARE)
    return order[tests:], order[:tests]


def write_images(workdir: Path, limit: int | None) -> dict[str, int]:
    """PNG files under <workdir>/digits/{train,test}/ and <workdir>/{train,test}.txt."""
    import cv2
    images, labels = load_digits()
    train, test = split(len(images), limit)
    counts = {}
    for name, indices in (("train", train), ("test", test)):
        folder = workdir / "digits" / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for index in indices:
            relative = f"{name}/{index:04d}.png"
            if not cv2.imwrite(str(workdir / "digits" / relative), images[index]):
                sys.exit(f"could not write {workdir / 'digits' / relative}")
            lines.append(f"{relative} {labels[index]}\n")
        (workdir / f"{name}.txt").write_text("".join(lines))
        counts[name] = len(lines)
    return counts


# -- running protonet's commands in this process ---------------------------------------
def protonet(*argv: str) -> None:
    """`protonet ARGV...`, echoed first; stops the example when the command fails."""
    print("$ protonet " + " ".join(argv), flush=True)
    code = cli.main(list(argv))
    if code:
        sys.exit(f"protonet {argv[0]} failed (exit status {code})")


def convert(workdir: Path) -> None:
    """2. The two lists to LMDBs with protonet's convert_imageset."""
    for name in ("train", "test"):
        db = workdir / f"digits_{name}_lmdb"
        if db.exists():             # a previous run's: convert-imageset never overwrites
            shutil.rmtree(db)
        protonet("convert-imageset", "--gray", "--resize_height", "28",
                 "--resize_width", "28", f"{workdir / 'digits'}/",
                 str(workdir / f"{name}.txt"), str(db))


# -- 3. the solver ------------------------------------------------------------------
def derived_solver(workdir: Path, iterations: int | None, test_count: int) -> Path:
    """Copies of the published solver and net in `workdir`, with absolute paths into
    it and, when `iterations` is given, a run of that length that still ends on a
    test. Returns the solver copy's path."""
    solver = read_text(str(SOLVER), caffe_pb2.SolverParameter())
    net = read_text(str(REPO / solver.net), caffe_pb2.NetParameter())
    for layer in net.layer:
        if layer.type == "Data":
            phase = layer.include[0].phase if layer.include else caffe_pb2.TRAIN
            name = "train" if phase == caffe_pb2.TRAIN else "test"
            layer.data_param.source = str(workdir / f"digits_{name}_lmdb")
            if phase == caffe_pb2.TEST:
                batch = layer.data_param.batch_size
                solver.test_iter[0] = max(1, test_count // batch)
    net_path = workdir / "lenet_train_test.prototxt"
    write_text(str(net_path), net)
    solver.net = str(net_path)
    solver.snapshot_prefix = str(workdir / "snapshots" / "lenet")
    if iterations:
        solver.max_iter = iterations
        if not solver.test_interval or iterations % solver.test_interval:
            solver.test_interval = iterations
        if solver.snapshot and iterations % solver.snapshot:
            solver.snapshot = 0       # the snapshot after training is still written
        solver.display = max(1, min(solver.display, iterations // 10))
    solver_path = workdir / "lenet_solver.prototxt"
    write_text(str(solver_path), solver)
    return solver_path


def train(solver: Path, cwd: Path, workdir: Path, gpu: str | None) -> None:
    """`protonet train` with its log also written to <workdir>/train.log."""
    handler = logging.FileHandler(workdir / "train.log", mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%m%d %H:%M:%S"))
    logger = logging.getLogger("protonet")
    logger.addHandler(handler)
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        argv = ["train", "--solver", os.path.relpath(solver) if cwd == REPO else str(solver),
                "--log-json", str(workdir / "train.log.jsonl")]
        if gpu is not None:
            argv += ["--gpu", gpu]
        protonet(*argv)
    finally:
        os.chdir(previous)
        logger.removeHandler(handler)
        handler.close()


# -- 4. curves and the summary ----------------------------------------------------------
def plot(workdir: Path) -> Path | None:
    log = str(workdir / "train.log")
    protonet("parse-log", log, "--out-dir", str(workdir))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no matplotlib, so no plot: pip install matplotlib, then "
              f"protonet plot-log {log} --out {workdir / 'curves.png'}")
        return None
    out = workdir / "curves.png"
    protonet("plot-log", log, "--out", str(out))
    return out


def final_accuracy(workdir: Path) -> tuple[int, float] | None:
    """(iteration, accuracy) of the last test pass in the JSON-lines log."""
    last = None
    with open(workdir / "train.log.jsonl", encoding="utf-8") as f:
        for line in f:
            event = json.loads(line)
            if event.get("event") == "test" and "accuracy" in event.get("outputs", {}):
                last = event["iter"], event["outputs"]["accuracy"]
    return last


def snapshots(workdir: Path, since: float) -> list[str]:
    """The snapshot files this run wrote (older runs' may sit beside them)."""
    found = [p for p in (workdir / "snapshots").glob("lenet_iter_*")
             if p.stat().st_mtime >= since - 1]

    def order(path: Path) -> tuple[int, str]:
        number = path.name[len("lenet_iter_"):].split(".")[0]
        return (int(number) if number.isdigit() else -1, path.name)
    return [p.name for p in sorted(found, key=order)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help="where every file goes (default: runs/mnist)")
    parser.add_argument("--gpu", help="GPU id to train on (default: the CPU)")
    parser.add_argument("--iterations", type=int,
                        help="training iterations (default: the solver's max_iter)")
    parser.add_argument("--limit", type=int,
                        help="use only this many of the 1797 images")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick check: 600 images, 60 iterations")
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit = args.limit or 600
        args.iterations = args.iterations or 60
    if args.limit is not None and args.limit < 12:
        parser.error("--limit needs at least 12 images (2 of them for testing)")
    if args.iterations is not None and args.iterations < 1:
        parser.error("--iterations must be positive")
    start = time.perf_counter()
    workdir = args.workdir.resolve()
    (workdir / "snapshots").mkdir(parents=True, exist_ok=True)

    print(f"writing the digits as PNG files under {workdir / 'digits'}", flush=True)
    counts = write_images(workdir, args.limit)
    print(f"{counts['train']} training and {counts['test']} test images", flush=True)
    convert(workdir)
    published = workdir == (REPO / DEFAULT_WORKDIR).resolve() and not args.iterations \
        and not args.limit
    if published:
        solver, cwd = SOLVER, REPO      # the published files, as is, from the repo root
    else:
        solver, cwd = derived_solver(workdir, args.iterations, counts["test"]), workdir
    train_start, train_start_time = time.perf_counter(), time.time()
    train(solver, cwd, workdir, args.gpu)
    train_wall = time.perf_counter() - train_start
    curves = plot(workdir)

    wall = time.perf_counter() - start
    result = final_accuracy(workdir)
    print()
    if result:
        print(f"final test accuracy: {result[1]:.4f} ({counts['test']} test images, "
              f"iteration {result[0]})")
    print(f"wall time:           {wall:.1f} s ({train_wall:.1f} s training)")
    print(f"log:                 {workdir / 'train.log'} (JSON lines: train.log.jsonl; "
          "tables: train.csv, test.csv)")
    if curves:
        print(f"plot:                {curves}")
    print(f"snapshots:           {workdir / 'snapshots'}/ "
          f"({', '.join(snapshots(workdir, train_start_time))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
