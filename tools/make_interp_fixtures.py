"""Regenerate tests/data/forks/interp_*.npz: PSPNet's Interp layer as OpenCV 4's dnn runs it
(tools/make_fork_fixtures.py makes the other fork layers' fixtures).

OpenCV 4.x (not 5, which has no Caffe importer) implements the fork's Interp layer; it is
the reference for protonet's, as BVLC Caffe is for the BVLC layers. Run with a Python
that has `opencv-python-headless<5` (never a protonet dependency), e.g.

    /path/to/venv-cv4/bin/python tools/make_interp_fixtures.py

Each file holds the prototxt text of a one-layer net, its input and OpenCV's output.
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "forks")

# name: (input shape, interp_param text). OpenCV 4.14 reads zoom_factor and height/width
# only: it sizes shrink_factor alone to 0x0 and ignores shrink_factor beside zoom_factor
# and pad_beg/pad_end, so those cases are checked against numpy loops written from the
# fork's C++ in tests/layers/test_fork_layers.py instead.
CASES = {
    "zoom": ((1, 2, 5, 7), "zoom_factor: 3"),
    "zoom_batch": ((2, 3, 4, 3), "zoom_factor: 4"),
    "size": ((1, 3, 4, 6), "height: 9 width: 13"),
    "size_down": ((1, 2, 11, 10), "height: 4 width: 3"),
    "size_odd": ((1, 1, 20, 19), "height: 157 width: 149"),
    "single": ((1, 1, 1, 1), "height: 3 width: 4"),
}


def prototxt(shape, param: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'name: "interp"\n'
            f'layer {{ name: "data" type: "Input" top: "data" '
            f'input_param {{ shape {{ {dims} }} }} }}\n'
            f'layer {{ name: "interp" type: "Interp" bottom: "data" top: "out" '
            f'interp_param {{ {param} }} }}\n')


def main() -> int:
    import cv2
    if int(cv2.__version__.split(".")[0]) != 4:
        print(f"needs OpenCV 4.x, this is {cv2.__version__}", file=sys.stderr)
        return 1
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.RandomState(14)
    for name, (shape, param) in CASES.items():
        text = prototxt(shape, param)
        with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
            f.write(text)
        try:
            net = cv2.dnn.readNetFromCaffe(f.name)
        finally:
            os.unlink(f.name)
        x = rng.uniform(-2, 2, size=shape).astype(np.float32)
        net.setInput(x)
        y = net.forward()
        np.savez(os.path.join(OUT, f"interp_{name}.npz"), prototxt=text, input=x, output=y,
                 opencv=cv2.__version__)
        print(f"interp_{name}: {list(shape)} -> {list(y.shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
