"""Regenerate tests/data/forks/res10_face_opencv.json: the faces OpenCV 4's dnn finds with
the res10 SSD face detector, the reference for `protonet detect`'s.

The test images are matplotlib's sample photo grace_hopper.jpg (matplotlib is a test
dependency) and that photo beside its mirror image (two faces), made the same way by
the tests. Preprocessing is OpenCV's face-detector sample's: the whole image resized to
300x300 (bilinear), BGR means 104, 177, 123 subtracted. Run with a Python that has
`opencv-python-headless<5`:

    /path/to/venv-cv4/bin/python tools/make_res10_reference.py CAFFEMODEL GRACE_HOPPER_JPG
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "protonet" / "model_zoo" / "res10_ssd_face" / "deploy.prototxt"
OUT = ROOT / "tests" / "data" / "forks" / "res10_face_opencv.json"
THRESHOLD = 0.15         # rows scoring below are left out (none lies near it, checked)
MEAN = (104.0, 177.0, 123.0)


def test_images(photo: np.ndarray) -> dict[str, np.ndarray]:
    return {"grace_hopper": photo, "grace_hopper_pair": np.hstack([photo, photo[:, ::-1]])}


def main(caffemodel: str, photo_path: str) -> int:
    if int(cv2.__version__.split(".")[0]) != 4:
        print("needs OpenCV 4 (5 has no Caffe importer)", file=sys.stderr)
        return 1
    net = cv2.dnn.readNetFromCaffe(str(DEPLOY), caffemodel)
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    photo = cv2.imread(photo_path, cv2.IMREAD_COLOR)
    images = {}
    for name, image in test_images(photo).items():
        resized = cv2.resize(image, (300, 300), interpolation=cv2.INTER_LINEAR)
        net.setInput(cv2.dnn.blobFromImage(resized, 1.0, (300, 300), MEAN))
        rows = net.forward()[0, 0]
        scores = rows[:, 2]
        assert not np.any(np.abs(scores - THRESHOLD) < 1e-3), "a score lies at the threshold"
        kept = rows[scores >= THRESHOLD]
        images[name] = {
            "pixels_md5": hashlib.md5(np.ascontiguousarray(image).tobytes()).hexdigest(),
            "shape": list(image.shape),
            "rows": [[int(r[1]), *(round(float(v), 7) for v in r[2:])] for r in kept],
        }
        print(name, len(kept), "rows; best", kept[:1].tolist())
    with open(caffemodel, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    OUT.write_text(json.dumps({
        "opencv": cv2.__version__, "caffemodel_sha256": digest, "threshold": THRESHOLD,
        "columns": ["label", "score", "xmin", "ymin", "xmax", "ymax"], "images": images,
    }, indent=1) + "\n")
    print("wrote", OUT)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
