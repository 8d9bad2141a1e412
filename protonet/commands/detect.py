"""`protonet detect`: boxes, labels and scores of SSD-style detectors on images.

A zoo name brings its weights (downloaded and verified on first use), preprocessing,
labels and score threshold; a deploy.prototxt needs --weights, and its preprocessing
comes from the flags (by default: resize to the net's input, no mean, scale 1).
Nothing here imports torch until the command runs.
"""
from __future__ import annotations

import json
import sys

from .classify import add_model_arguments, model_from_args


def register(sub) -> None:
    p = sub.add_parser("detect", help="detect objects with an SSD-style zoo model or net",
                       description="Print (or --json) the boxes, labels and scores an "
                                   "SSD-style net (DetectionOutput) finds in each image; "
                                   "--out draws them.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--threshold", type=float,
                   help="lowest score shown (default: the model's, else 0.5)")
    p.add_argument("--out", metavar="DIR", help="write each image with its boxes drawn here")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_model_arguments(p, labels_help="label file, one per line, line N naming label N",
                        image_size_help="resize to H[,W] (default: the net's input)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import detect
    from ..device import select_device

    model = model_from_args(args, detect)
    results = detect.detect(model, args.images, args.threshold,
                            device=select_device(args.gpu))
    written = {}
    if args.out:
        taken: set[str] = set()
        written = {id(r): detect.write_drawn(r, args.out, taken) for r in results}
    if args.json:
        payload = []
        for r in results:
            entry = r.to_dict()
            if args.out:
                entry["drawn"] = written[id(r)]
            payload.append(entry)
        json.dump(payload, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    for r in results:
        count = len(r.detections)
        print(f"{r.path}: {count} detection{'s' if count != 1 else ''}"
              + (f" -> {written[id(r)]}" if args.out else ""))
        for d in r.detections:
            x1, y1, x2, y2 = d.box
            print(f"  {d.score:.4f}  {d.name or d.label}  "
                  f"[{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")
    return 0
