"""The `protonet` command ends with os._exit after its exit handlers and a flush
(protonet.cli.run): output, exit codes and files must be what a normal exit gives."""
from __future__ import annotations

import subprocess
import sys

from protonet.io.text import read_text
from protonet.proto import caffe_pb2

V1_NET = """name: "tiny"
input: "data"
input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip"
         inner_product_param { num_output: 3 } }
"""


def _protonet(*args, cwd=None):
    code = ("import atexit, sys; atexit.register(lambda: print('exit handler ran', "
            "file=sys.stderr)); sys.argv = ['protonet'] + sys.argv[1:]; "
            "from protonet.cli import run; run()")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_success_flushes_output_runs_exit_handlers_and_writes_files(tmp_path):
    old, new = tmp_path / "v1.prototxt", tmp_path / "new.prototxt"
    old.write_text(V1_NET)
    done = _protonet("upgrade-net", str(old), str(new))
    assert done.returncode == 0, done.stderr
    assert done.stderr.rstrip().endswith("exit handler ran")
    net = read_text(str(new), caffe_pb2.NetParameter())
    assert [layer.type for layer in net.layer] == ["Input", "InnerProduct"]


def test_error_exit_code_and_message(tmp_path):
    done = _protonet("upgrade-net", str(tmp_path / "missing.prototxt"), str(tmp_path / "o"))
    assert done.returncode == 1
    assert "protonet upgrade-net: error:" in done.stderr and "missing.prototxt" in done.stderr
    assert "exit handler ran" in done.stderr
