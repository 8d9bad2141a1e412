"""tools/check_fork_sample.py runs a folder of prototxts and reports each outcome."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORKS = ROOT / "tests" / "data" / "forks"


def test_check_fork_sample_table(tmp_path):
    for case in ("roi_pooling", "shuffle_channel", "conv_depthwise"):
        shutil.copy(FORKS / f"{case}.prototxt", tmp_path)
    (tmp_path / "broken.prototxt").write_text('layer { name: "x" seg_accuracy_param { } }')
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_fork_sample.py"),
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()
            if line.startswith("| ") and ".prototxt" in line}
    assert "| ok |" in rows["roi_pooling.prototxt"]
    assert "pool[8, 3, 3, 4]" in rows["roi_pooling.prototxt"]
    assert "ConvolutionDepthwise" in rows["conv_depthwise.prototxt"]
    assert "PSPNet" in rows["broken.prototxt"]            # the fork-naming ParseError
    assert "3 of 4 ran" in result.stdout
