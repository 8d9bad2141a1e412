"""Caffe's own python/caffe/test suite, unmodified, run on protonet.

The test modules come from PyPI's brocolli-caffe 9.0.2 sdist (BVLC Caffe's python
tree; .ci/run downloads it, as open_nsfw's weights): 8 of BVLC's 10 modules, 6 of them
identical to BVLC master's. They run in a pytest subprocess whose only addition is a
conftest calling protonet.caffe.alias(), so `import caffe` is protonet. Nothing of
Caffe's is committed here; without the sdist these tests skip.

BVLC master's test_draw.py and test_nccl.py are not in the sdist (and its
test_python_layer.py / test_solver.py differ from the sdist's only in Windows file
handling): their behaviours are covered below by tests of our own.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SDIST = "brocolli-caffe-9.0.2.tar.gz"
TEST_DIR = "python/caffe/test/"
MODULES = ["test_coord_map", "test_io", "test_layer_type_list", "test_net",
           "test_net_spec", "test_python_layer", "test_python_layer_with_param_str",
           "test_solver"]
ROOT = Path(__file__).resolve().parents[1]


def sdist_path() -> Path | None:
    """The sdist in $PROTONET_CAFFE_SUITE_DIR or ~/.cache/protonet/caffe-suite."""
    folders = [os.environ.get("PROTONET_CAFFE_SUITE_DIR"),
               Path.home() / ".cache" / "protonet" / "caffe-suite"]
    for folder in folders:
        if folder and (Path(folder) / SDIST).is_file():
            return Path(folder) / SDIST
    return None


def extract(sdist: Path, target: Path, wanted) -> list[Path]:
    """Members of the sdist whose path (below its top folder) `wanted` accepts."""
    found = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            inner = member.name.split("/", 1)[-1]
            if not member.isfile() or not wanted(inner):
                continue
            path = target / inner
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(member).read())
            found.append(path)
    return found


@pytest.fixture(scope="module")
def sdist() -> Path:
    path = sdist_path()
    if path is None:
        pytest.skip(f"{SDIST} not found ($PROTONET_CAFFE_SUITE_DIR or "
                    "~/.cache/protonet/caffe-suite; .ci/run downloads it)")
    return path


@pytest.fixture(scope="module")
def suite_results(sdist, tmp_path_factory) -> dict[str, dict[str, list[str]]]:
    """Run the suite once: {module: {"passed"|"failed"|"skipped": [test names]}}."""
    return run_suite(sdist, tmp_path_factory)


def run_suite(sdist: Path, tmp_path_factory, **extra_env: str):
    root = tmp_path_factory.mktemp("caffe_suite")
    files = extract(sdist, root, lambda p: p.startswith(TEST_DIR) and p.endswith(".py"))
    assert sorted(f.stem for f in files if f.stem.startswith("test_")) == MODULES
    folder = root / TEST_DIR
    (folder / "conftest.py").write_text("import protonet.caffe\nprotonet.caffe.alias()\n")
    report = root / "report.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra_env)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-W", "ignore", f"--junitxml={report}", "."], cwd=folder,
                         env=env, capture_output=True, text=True, timeout=600)
    if not report.is_file():
        pytest.fail(f"the suite did not run:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    results: dict[str, dict[str, list[str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[0]
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
        results.setdefault(module, {}).setdefault(outcome, []).append(
            f"{case.get('classname')}.{case.get('name')}")
    results["_output"] = {"tail": [run.stdout[-4000:]]}
    return results


@pytest.mark.parametrize("module", MODULES)
def test_caffes_own_test_module_passes(suite_results, module):
    got = suite_results.get(module, {})
    assert got.get("passed"), f"{module}: nothing passed\n{suite_results['_output']['tail'][0]}"
    assert not got.get("failed"), \
        f"{module}: {got['failed']}\n{suite_results['_output']['tail'][0]}"
    assert not got.get("skipped"), f"{module}: skipped {got['skipped']}"


def test_caffes_suite_runs_every_test(suite_results):
    counts = {m: len(suite_results.get(m, {}).get("passed", [])) for m in MODULES}
    print("Caffe's python/caffe/test on protonet:", counts, sum(counts.values()), "passed")
    # the sdist's modules hold 50 tests; each must have run
    assert sum(counts.values()) == 50


def test_caffes_suite_passes_on_the_gpu_host_buffer_path(sdist, tmp_path_factory):
    """The same suite with .data/.diff through host buffers kept in sync with the
    tensors, as on a GPU (protonet.hostsync), forced here on the CPU."""
    results = run_suite(sdist, tmp_path_factory, PROTONET_PYCAFFE_SYNCED="1")
    failed = [name for m in MODULES for name in results.get(m, {}).get("failed", [])]
    assert not failed, f"{failed}\n{results['_output']['tail'][0]}"
    assert sum(len(results.get(m, {}).get("passed", [])) for m in MODULES) == 50


# --- BVLC master's modules the sdist lacks: our own tests of their behaviour ---------

def test_draw_net_draws_every_model_prototxt(sdist, tmp_path):
    """BVLC's test_draw: caffe.draw.draw_net(net, 'LR') for every net prototxt of the
    source tree (solvers excepted); here the sdist's models/."""
    from google.protobuf import text_format

    import protonet.caffe as caffe
    from protonet.caffe.proto import caffe_pb2
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    files = extract(sdist, tmp_path, lambda p: p.startswith("models/") and
                    p.endswith(".prototxt") and "solver" not in p)
    assert len(files) >= 5
    for path in files:
        net = caffe_pb2.NetParameter()
        text_format.Merge(path.read_text(), net)
        drawing = caffe.draw.draw_net(net, "LR")      # PNG bytes, as pydot's create_png
        assert drawing.startswith(b"\x89PNG"), path


def test_nccl_uid_type():
    """BVLC's test_nccl: with NCCL, new_uid() is bytes on Python 3; without it (a CPU
    build) there is nothing to test, and has_nccl() says so."""
    import protonet.caffe as caffe
    has = caffe.has_nccl()
    assert isinstance(has, bool)
    if has:
        assert isinstance(caffe.NCCL.new_uid(), bytes)
