"""Build and run a folder of published (fork) deploy prototxts with random weights.

For each *.prototxt in FOLDER this reads the file, builds the net in the TEST phase
(weights from the prototxt's fillers), fills its inputs with random data (boxes
for inputs named like `rois`, [height, width, scale] for `im_info`), runs one
forward pass and prints a table: the fork layer types it uses, the result, the
output shapes and the time. Nothing is compared with a reference; it shows that
protonet reads and runs the file. The sample used for docs/forks.md is listed
there (the files are others' code and are not in this repository).

    python tools/check_fork_sample.py /tmp/fork_sample [--pythonpath DIR]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORK_TYPES = {
    "BN", "Upsample", "Interp", "DenseImageData", "PriorBox", "DetectionOutput",
    "Permute", "Normalize", "ROIPooling", "PSROIPooling", "Axpy", "ShuffleChannel",
    "ConvolutionDepthwise", "SmoothL1Loss", "MultiBoxLoss", "AnnotatedData", "Python",
}


def _inputs(net, rng):
    import numpy as np
    values = {}
    for name in net.inputs:
        shape = net.blobs[name].data.shape
        if "rois" in name and len(shape) >= 2 and shape[1] == 5:
            n = shape[0]
            side = 200.0
            xy = rng.uniform(0, side * 0.6, (n, 2))
            wh = rng.uniform(8, side * 0.4, (n, 2))
            boxes = np.concatenate([np.zeros((n, 1)), xy, xy + wh], 1)
            values[name] = boxes.reshape(shape).astype(np.float32)
        elif name == "im_info":
            h, w = net.blobs["data"].data.shape[2:] if "data" in net.blobs else (224, 224)
            values[name] = np.tile(np.float32([h, w, 1.0]), (shape[0], 1)).reshape(shape)
        else:
            values[name] = rng.standard_normal(shape).astype(np.float32)
    return values


def check(path: Path, rng) -> dict:
    import protonet
    from protonet.io.upgrade import read_net
    row = {"file": path.name, "fork": "", "result": "", "outputs": "", "seconds": ""}
    try:
        param = read_net(str(path))
    except protonet.ProtonetError as e:
        row["result"] = f"parse error: {e}"
        return row
    types = {layer.type for layer in param.layer}
    row["fork"] = ",".join(sorted(types & FORK_TYPES))
    start = time.perf_counter()
    try:
        net = protonet.Net(param, protonet.TEST)
        # Input layers of a deploy net may give the batch as 10 (oversampling);
        # one item is enough to show that it runs.
        out = net.forward(**_inputs(net, rng))
    except Exception as e:     # noqa: BLE001 - a table of outcomes, not a test
        row["result"] = f"{type(e).__name__}: {e}".replace("\n", " ")[:160]
        return row
    row["seconds"] = f"{time.perf_counter() - start:.1f}"
    row["result"] = "ok"
    row["outputs"] = " ".join(f"{k}{list(v.shape)}" for k, v in out.items())[:80]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--pythonpath", action="append", default=[],
                        help="a folder to import Python layers from (e.g. py-faster-rcnn's lib/)")
    args = parser.parse_args()
    sys.path[:0] = args.pythonpath
    import numpy as np
    import torch
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warnings.simplefilter("ignore")
    logging.getLogger("protonet").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    rows = [check(p, rng) for p in sorted(args.folder.glob("*.prototxt"))]
    cols = ["file", "fork", "result", "outputs", "seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]).replace("|", "/") for c in cols) + " |")
    ok = sum(r["result"] == "ok" for r in rows)
    print(f"\n{ok} of {len(rows)} ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
