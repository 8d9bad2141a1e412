"""Commands that run no net answer without importing torch (or the net machinery):
`--help`, `zoo list`, the log and upgrade tools, and every command's error path for a
missing file. Each case runs in a fresh interpreter, which then reports whether torch
was loaded; `import protonet` itself must stay free of torch as well."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_logs import CAFFE_LOG

V1_NET = """name: "tiny"
input: "data"
input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip"
         inner_product_param { num_output: 3 } }
"""
V1_SOLVER = 'net: "net.prototxt"\nbase_lr: 0.01\nsolver_type: NESTEROV\n'

# Runs each argv through protonet.cli.main in one process per case and prints
# {"code": exit code, "torch": loaded?, "heavy": protonet modules that need torch}.
PROBE = """
import json, sys
sys.argv = ["protonet"] + sys.argv[1:]
from protonet import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in sys.modules if m.startswith(("protonet.net.module",
               "protonet.pycaffe", "protonet.solver", "protonet.speed", "protonet.layers")))
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "heavy": heavy}),
      file=sys.__stdout__)
"""


def probe(args, cwd) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = {
    "help": (["--help"], 0),
    "train_help": (["train", "--help"], 0),
    "time_help": (["time", "--help"], 0),
    "zoo_list": (["zoo", "list"], 0),
    "parse_log": (["parse-log", "caffe.log", "--out-dir", "."], 0),
    "plot_log_missing": (["plot-log", "missing.log"], 1),
    "upgrade_net": (["upgrade-net", "v1.prototxt", "new.prototxt"], 0),
    "upgrade_solver": (["upgrade-solver", "v1.solver", "new.solver"], 0),
    "draw_net_missing": (["draw-net", "missing.prototxt", "out.dot"], 1),
    "train_missing": (["train", "--solver", "missing.prototxt"], 1),
    "test_missing": (["test", "--model", "missing.prototxt", "--weights", "w"], 1),
    "time_missing": (["time", "--model", "missing.prototxt"], 1),
    "classify_missing": (["classify", "--model", "missing.prototxt", "--weights", "w",
                          "a.jpg"], 1),
    "classify_missing_image": (["classify", "--model", "v1.prototxt", "--weights",
                                "v1.prototxt", "missing.jpg"], 1),
    "export_missing": (["export", "--model", "missing.prototxt", "--onnx", "o.onnx"], 1),
    "finetune_unknown": (["finetune", "no_such_model", "--train", "a", "--val", "b",
                          "--num-classes", "2"], 1),
    "sweep_missing": (["sweep", "--solver", "missing.prototxt", "--grid", "base_lr=1"], 1),
    "convert_missing": (["convert-imageset", ".", "missing.txt", "db"], 1),
    "mean_missing": (["compute-image-mean", "missing_db"], 1),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("startup")
    (path / "caffe.log").write_text(CAFFE_LOG)
    (path / "v1.prototxt").write_text(V1_NET)
    (path / "v1.solver").write_text(V1_SOLVER)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_command_runs_without_torch(workdir, case):
    args, code = CASES[case]
    result = probe(args, workdir)
    assert result["code"] == code, result
    assert not result["torch"] and not result["heavy"], result


def test_import_protonet_is_light_and_names_still_resolve():
    code = ("import sys, protonet; light = 'torch' not in sys.modules; "
            "net = protonet.Net; solver = protonet.SGDSolver; layer = protonet.Layer; "
            "from protonet import caffe_pb2, TRAIN; "
            "print(light, net.__name__, solver.__name__, layer.__name__, TRAIN)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["True", "Net", "SGDSolver", "PythonLayer", "0"], \
        done.stderr
    with pytest.raises(AttributeError):
        import protonet
        protonet.NoSuchName


def test_precision_names_match_speed():
    from protonet.commands import PRECISION_NAMES
    from protonet.speed import PRECISIONS
    assert tuple(PRECISIONS) == PRECISION_NAMES
