"""Faults while training or converting: killed processes, full disks, signals, NaN.

The kills and signals hit real `protonet` child processes. To kill one in the middle
of writing a file, the child first imports a small hook (written by these tests)
that makes one chosen write stop halfway and wait; to fill the disk, the child runs
under RLIMIT_FSIZE (writes past the limit fail with EFBIG, as they would with
ENOSPC), and an in-process test makes the write path raise ENOSPC itself.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from protonet.cli import main as cli_main
from protonet.errors import ProtonetError, SolverError
from protonet.io import atomic
from protonet.io.weights import read_weights
from protonet.solver import get_solver
from protonet.solver import reporting as solver_reporting
from protonet.solver.snapshot import read_state

REPO = Path(__file__).resolve().parents[1]
ROWS, FEATURES = 12, 5

NET = """name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train.txt" batch_size: 4 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: %(outputs)d weight_filler { type: "gaussian" std: 0.3 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

HOOK = '''"""Imported by a child protonet process (tests/test_faults.py) before it runs.

PAUSE_ON: the first write to a temporary file whose name contains this string
writes half its bytes, flushes them, touches $PAUSED and waits to be killed.
PAUSE_AFTER_COMMITS=n: convert-imageset commits every 2 records and, after n
commits, touches $PAUSED and waits.
"""
import builtins
import os
import time

_open = builtins.open


def _pause():
    with _open(os.environ["PAUSED"], "w"):
        pass
    time.sleep(3600)


class _HalfWriter:
    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[:len(data) // 2])
        self._handle.flush()
        os.fsync(self._handle.fileno())
        _pause()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _open_pausing(file, mode="r", *args, **kwargs):
    handle = _open(file, mode, *args, **kwargs)
    name = str(file) if isinstance(file, (str, os.PathLike)) else ""
    if "w" in mode and os.environ["PAUSE_ON"] in name and name.endswith(".tmp"):
        return _HalfWriter(handle)
    return handle


if os.environ.get("PAUSE_ON"):
    builtins.open = _open_pausing
if os.environ.get("PAUSE_AFTER_COMMITS"):
    import protonet.data.imageset as imageset
    imageset.COMMIT_EVERY = 2
    _commit = imageset._LmdbWriter.commit
    _done = [0]

    def commit(self):
        _commit(self)
        _done[0] += 1
        if _done[0] >= int(os.environ["PAUSE_AFTER_COMMITS"]):
            _pause()
    imageset._LmdbWriter.commit = commit
'''

RUN = "import sys, fault_hook; from protonet.cli import main; sys.exit(main(sys.argv[1:]))"


UNQUOTED = ("snapshot_after_train", "snapshot_format")      # enums and bools


def _solver_text(**fields) -> str:
    base = dict(net="net.prototxt", base_lr=0.1, momentum=0.9, lr_policy="fixed",
                max_iter=9, snapshot=3, display=0, snapshot_prefix="snap/tiny",
                random_seed=1, snapshot_after_train="false")
    base.update(fields)
    lines = []
    for key, value in base.items():
        text = json.dumps(value) if isinstance(value, str) and key not in UNQUOTED else value
        lines.append(f"{key}: {text}")
    return "\n".join(lines) + "\n"


def _make_work(folder: Path, outputs: int = 3, value: float | None = None, **solver) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with h5py.File(folder / "data.h5", "w") as f:
        data = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
        f["data"] = data if value is None else np.full_like(data, value)
        f["label"] = (np.arange(ROWS) % 3).astype(np.float32)
    (folder / "train.txt").write_text("data.h5\n")
    (folder / "net.prototxt").write_text(NET % {"outputs": outputs})
    (folder / "solver.prototxt").write_text(_solver_text(**solver))
    (folder / "snap").mkdir(exist_ok=True)
    (folder / "hooks").mkdir(exist_ok=True)
    (folder / "hooks" / "fault_hook.py").write_text(HOOK)
    return folder


def _child(folder: Path, args: list[str], limit_bytes: int | None = None, **env):
    """A `protonet` child process in `folder` with the hook loaded; stderr piped."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PAUSE_ON": "",
                   "PAUSED": str(folder / "paused"),
                   "PYTHONPATH": os.pathsep.join([str(folder / "hooks"), str(REPO),
                                                  os.environ.get("PYTHONPATH", "")]),
                   **env}

    def limit():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.Popen([sys.executable, "-c", RUN, *args], cwd=folder,
                            env=environment, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit)


def _wait_for(condition, child, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"child exited ({child.returncode}) before {what}: "
                                 f"{child.stderr.read()[-2000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _kill(child, reader: threading.Thread | None = None) -> None:
    """SIGKILL the child (unless it has exited) and close its stderr pipe."""
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    if reader is not None:
        reader.join(timeout=30)
    child.stderr.close()


def _weights(path: Path) -> list[np.ndarray]:
    return [np.asarray(b.data) for layer in read_weights(str(path)).layer for b in layer.blobs]


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# -- SIGKILL in the middle of a snapshot ---------------------------------------------
@pytest.mark.parametrize("file", ["caffemodel", "solverstate"])
def test_sigkill_while_snapshotting_keeps_the_previous_snapshot_resumable(
        tmp_path, monkeypatch, file):
    work = _make_work(tmp_path / "work")
    child = _child(work, ["train", "--solver", "solver.prototxt"],
                   PAUSE_ON=f"tiny_iter_6.{file}.")
    try:
        _wait_for((work / "paused").exists, child, what="the paused snapshot write")
    finally:
        _kill(child)
    assert child.returncode == -signal.SIGKILL
    snap = work / "snap"
    # The kill hit the second snapshot halfway through one of its files ...
    partial = list(snap.glob(f".tiny_iter_6.{file}.*.tmp"))
    assert len(partial) == 1
    assert partial[0].stat().st_size < (snap / f"tiny_iter_3.{file}").stat().st_size
    assert not (snap / "tiny_iter_6.solverstate").exists()
    # ... and the previous snapshot is whole ...
    assert read_state(str(snap / "tiny_iter_3.solverstate")).iter == 3
    assert read_state(str(snap / "tiny_iter_3.solverstate")).learned_net.endswith(
        "tiny_iter_3.caffemodel")
    _weights(snap / "tiny_iter_3.caffemodel")
    # ... and resumable: the resumed run ends where an uninterrupted run ends.
    monkeypatch.chdir(work)
    assert cli_main(["-q", "train", "--solver", "solver.prototxt",
                     "--snapshot", "snap/tiny_iter_3.solverstate"]) == 0
    assert read_state(str(snap / "tiny_iter_9.solverstate")).iter == 9
    reference = _make_work(tmp_path / "reference")
    monkeypatch.chdir(reference)
    assert cli_main(["-q", "train", "--solver", "solver.prototxt"]) == 0
    for resumed, whole in zip(_weights(snap / "tiny_iter_9.caffemodel"),
                              _weights(reference / "snap" / "tiny_iter_9.caffemodel")):
        np.testing.assert_array_equal(resumed, whole)


def test_sigkill_while_converting_leaves_no_database_under_the_name(tmp_path, monkeypatch):
    work = _make_work(tmp_path / "work")
    images = work / "images"
    images.mkdir()
    lines = []
    for i in range(12):
        cv2.imwrite(str(images / f"{i}.png"), np.full((8, 8, 3), i * 20, np.uint8))
        lines.append(f"{i}.png {i % 3}")
    (work / "list.txt").write_text("\n".join(lines) + "\n")
    args = ["convert-imageset", "images/", "list.txt", "db"]
    child = _child(work, args, PAUSE_AFTER_COMMITS="2")
    try:
        _wait_for((work / "paused").exists, child, what="the paused conversion")
    finally:
        _kill(child)
    assert not (work / "db").exists()
    assert [p.name for p in work.glob(".db.*.partial")]    # the staging folder, hidden
    monkeypatch.chdir(work)
    assert cli_main(["-q", *args, "--threads", "1"]) == 0   # the name is free to use
    from protonet.data.lmdb_source import RecordCursor
    cursor = RecordCursor("db")
    try:
        assert len(list(cursor.scan())) == 12
    finally:
        cursor.close()


# -- a full disk ------------------------------------------------------------------------
def _no_space(fail_on: str):
    """An `open` for protonet.io.atomic whose files for `fail_on` fill the disk."""
    real_open = open

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            self.handle.write(data[:len(data) // 3])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return Full(handle) if "w" in mode and fail_on in str(file) else handle
    return fake_open


@pytest.mark.parametrize("fail_on", [".caffemodel.", ".solverstate."])
def test_full_disk_during_a_snapshot_keeps_the_old_files(tmp_path, monkeypatch, fail_on):
    work = _make_work(tmp_path / "work", snapshot=0)
    monkeypatch.chdir(work)
    solver = get_solver("solver.prototxt")
    solver.step(3)
    solver.snapshot()
    before = {p.name: p.read_bytes() for p in (work / "snap").iterdir()}
    solver.step(3)
    monkeypatch.setattr(atomic, "open", _no_space(fail_on), raising=False)
    with pytest.raises(ProtonetError, match=r"snap/tiny_iter_6\.\w+: could not write "
                                            r"\(No space left on device\); the previous"):
        solver.snapshot()
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (work / "snap").iterdir()}
    assert {k: after[k] for k in before} == before                 # old files intact
    assert not [n for n in after if n.endswith(".tmp")]            # nothing half-written
    assert "tiny_iter_6.solverstate" not in after
    assert read_state(str(work / "snap" / "tiny_iter_3.solverstate")).iter == 3


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_full_disk_in_a_training_process_is_one_clear_error(tmp_path, monkeypatch, fmt):
    # A model of ~40 KB; writes past 20 KB fail as on a full disk (EFBIG).
    work = _make_work(tmp_path / "work", outputs=2000, snapshot_format=fmt, max_iter=6)
    monkeypatch.chdir(work)
    assert cli_main(["-q", "train", "--solver", "solver.prototxt"]) == 0
    ext = ".h5" if fmt == "HDF5" else ""
    state = f"snap/tiny_iter_3.solverstate{ext}"
    before = {p.name: p.read_bytes() for p in (work / "snap").iterdir()
              if "_iter_3." in p.name}
    assert len(before) == 2
    for path in (work / "snap").glob("*_iter_6*"):
        path.unlink()
    child = _child(work, ["train", "--solver", "solver.prototxt", "--snapshot", state],
                   limit_bytes=20_000)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("protonet train: error: snap/tiny_iter_6.caffemodel"), err[-3000:]
    assert "could not write" in last and "File too large" in last
    assert "Traceback" not in err
    after = {p.name: p.read_bytes() for p in (work / "snap").iterdir()}
    assert {k: after[k] for k in before} == before
    assert not [n for n in after if "_iter_6" in n or n.endswith(".tmp")]


def test_full_disk_while_converting_leaves_nothing(tmp_path):
    work = _make_work(tmp_path / "work")
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, (32, 32, 3), np.uint8))
    (work / "list.txt").write_text("".join(f"{i}.png 0\n" for i in range(40)))
    child = _child(work, ["convert-imageset", "images/", "list.txt", "db", "--threads", "1"],
                   limit_bytes=50_000)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1, err[-3000:]
    assert "protonet convert-imageset: error:" in err and "could not write the database" \
        in err and "Traceback" not in err
    assert not (work / "db").exists() and not list(work.glob(".db.*"))


def test_full_disk_for_the_json_log_is_a_solver_error(tmp_path, monkeypatch):
    work = _make_work(tmp_path / "work", display=1)
    monkeypatch.chdir(work)
    solver = get_solver("solver.prototxt", log_json=str(work / "log.jsonl"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(solver_reporting, "open", no_space, raising=False)
    with pytest.raises(SolverError, match="log.jsonl: could not write the JSON log "
                                          r"\(No space left on device\)"):
        solver.step(2)


# -- SIGINT and SIGHUP ------------------------------------------------------------------
class _Lines:
    """Collects a child's stderr lines on a thread."""

    def __init__(self, child):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(child,), daemon=True)
        self.thread.start()

    def _read(self, child) -> None:
        for line in child.stderr:
            self.lines.append(line)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def text(self) -> str:
        return "".join(self.lines)


def _training(work: Path, *flags: str):
    (work / "solver.prototxt").write_text(_solver_text(max_iter=10_000_000, snapshot=0,
                                                       display=50,
                                                       snapshot_after_train="true"))
    child = _child(work, ["train", "--solver", "solver.prototxt", *flags])
    lines = _Lines(child)
    deadline = time.time() + 90
    while lines.count("Iteration 50 ") == 0:
        assert child.poll() is None, lines.text()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.02)
    return child, lines


def _states(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "snap").glob("*.solverstate"))


def _still_training(child, lines, past: int = 2) -> None:
    """The child keeps iterating: `past` more display lines arrive."""
    seen = lines.count("Iteration ")
    deadline = time.time() + 60
    while lines.count("Iteration ") < seen + past:
        assert child.poll() is None, lines.text()[-3000:]
        assert time.time() < deadline, "training stalled"
        time.sleep(0.02)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
@pytest.mark.parametrize("sigint, sighup", [("stop", "snapshot"), ("snapshot", "stop"),
                                            ("none", "none")])
def test_signals_follow_their_effect_flags(tmp_path, sigint, sighup):
    work = _make_work(tmp_path / "work")
    child, lines = _training(work, "--sigint_effect", sigint, "--sighup_effect", sighup)
    order = sorted([(signal.SIGHUP, sighup), (signal.SIGINT, sigint)],
                   key=lambda pair: pair[1] == "stop")          # the stopping one last
    try:
        for signum, effect in order:
            states = _states(work)
            child.send_signal(signum)
            if effect == "snapshot":
                _wait_for(lambda: len(_states(work)) > len(states), child,
                          what=f"the snapshot after {signum.name}")
                _still_training(child, lines)
            elif effect == "none":
                _still_training(child, lines)
                assert _states(work) == states
            else:                                       # stop: clean exit, final snapshot
                assert child.wait(timeout=60) == 0, lines.text()[-3000:]
                lines.thread.join(timeout=30)
                assert lines.count("Optimization stopped early.") == 1
                assert len(_states(work)) == len(states) + 1
        if sigint == sighup == "none":
            assert child.poll() is None
    finally:
        _kill(child, lines.thread)


# -- NaN and Inf losses -------------------------------------------------------------------
EXP_NET = """name: "exp"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train.txt" batch_size: 4 } }
layer { name: "scale" type: "Power" bottom: "data" top: "scaled" power_param { scale: 1 } }
layer { name: "exp" type: "Exp" bottom: "scaled" top: "e" }
layer { name: "ip" type: "InnerProduct" bottom: "e" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_a_non_finite_loss_stops_at_the_first_non_finite_layer(tmp_path, monkeypatch):
    work = _make_work(tmp_path / "work", value=100.0)          # exp(100) is inf in float32
    (work / "net.prototxt").write_text(EXP_NET)
    monkeypatch.chdir(work)
    solver = get_solver("solver.prototxt")
    weights = [p.detach().clone() for p in solver.train_module.parameters()]
    with pytest.raises(SolverError, match=r"solver.prototxt: iteration 0: the loss is \w+; "
                                          r"the first non-finite output is top 'e' of layer "
                                          r"'exp' \(Exp\)\. Training stopped"):
        solver.step(5)
    assert solver.iter == 0
    for before, after in zip(weights, solver.train_module.parameters()):
        assert bool((before == after).all())            # the bad update was not applied


QUADRATIC_NET = """name: "quadratic"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train.txt" batch_size: 4 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_divergence_names_the_iteration_and_the_layer(tmp_path, monkeypatch):
    # Too large a rate on a quadratic loss: the weights grow geometrically until the
    # squared error overflows float32, some twenty iterations in.
    work = _make_work(tmp_path / "work", base_lr=10.0, momentum=0.0)
    (work / "net.prototxt").write_text(QUADRATIC_NET)
    monkeypatch.chdir(work)
    solver = get_solver("solver.prototxt")
    with pytest.raises(SolverError) as caught:
        solver.step(200)
    assert solver.iter > 5
    assert f"iteration {solver.iter}: the loss is inf; the first non-finite output is top " \
           "'loss' of layer 'loss' (EuclideanLoss)" in str(caught.value)


def test_continue_on_non_finite_loss_when_asked(tmp_path, monkeypatch):
    work = _make_work(tmp_path / "work", value=100.0, max_iter=4)
    (work / "net.prototxt").write_text(EXP_NET)
    monkeypatch.chdir(work)
    solver = get_solver("solver.prototxt", nan_effect="continue")
    solver.step(4)
    assert solver.iter == 4
    with pytest.raises(SolverError, match="nan_effect must be"):
        get_solver("solver.prototxt", nan_effect="maybe")


def test_cli_nan_effect(tmp_path, monkeypatch, capsys):
    work = _make_work(tmp_path / "work", value=100.0, max_iter=4)
    (work / "net.prototxt").write_text(EXP_NET)
    monkeypatch.chdir(work)
    assert cli_main(["-q", "train", "--solver", "solver.prototxt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("protonet train: error: solver.prototxt: iteration 0: the "
                              "loss is ")
    assert "the first non-finite output is top 'e' of layer 'exp' (Exp)" in err[-1]
    assert cli_main(["-q", "train", "--solver", "solver.prototxt",
                     "--nan_effect", "continue"]) == 0


def test_nothing_is_unpickled():
    """No reader uses pickle; a torch.load anywhere must say weights_only=True."""
    import re
    for path in (REPO / "protonet").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*import (c?pickle|dill|shelve|marshal)\b", text, re.M), path
        assert "allow_pickle=True" not in text, path
        for call in re.findall(r"torch\.load\((.*?)\)", text, re.S):
            assert "weights_only=True" in call, (path, call)


# -- safe loading: Python layers and the model zoo ----------------------------------------
PYTHON_NET = """layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ dim: 2 }} }} }}
layer {{ name: "py" type: "Python" bottom: "x" top: "y"
  python_param {{ module: "{module}" layer: "{layer}" }} }}
"""


def test_python_layers_load_only_a_layer_class_from_the_named_module(tmp_path, monkeypatch):
    from protonet.errors import NetError
    from protonet.io.upgrade import read_net
    from protonet.net.module import NetModule
    # A module beside the prototxt is not imported (its folder is not searched) ...
    (tmp_path / "beside.py").write_text("raise SystemExit('imported!')\n")
    (tmp_path / "net.prototxt").write_text(PYTHON_NET.format(module="beside", layer="L"))
    monkeypatch.chdir(REPO)
    with pytest.raises(NetError, match="cannot import module 'beside'.*not searched"):
        NetModule(read_net(str(tmp_path / "net.prototxt")))
    # ... and a name that is not a PythonLayer class is never called.
    called = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a))
    (tmp_path / "net.prototxt").write_text(PYTHON_NET.format(module="os", layer="system"))
    with pytest.raises(NetError, match="os.system must be a class derived from"):
        NetModule(read_net(str(tmp_path / "net.prototxt")))
    assert called == []


def _self_signed(folder: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import ipaddress
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Server:
    """A local HTTP(S) server for `files` ({path: bytes} or {path: ('redirect', url)})."""

    def __init__(self, files: dict, tls: tuple[Path, Path] | None = None):
        import http.server
        import ssl

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                entry = files.get(self.path)
                if isinstance(entry, tuple):
                    self.send_response(302)
                    self.send_header("Location", entry[1])
                    self.end_headers()
                    return
                if entry is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(entry)))
                self.end_headers()
                self.wfile.write(entry)

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.base = f"{scheme}://localhost:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _zoo_entry(tmp_path: Path, payload: bytes, url: str, **meta):
    import hashlib
    from protonet import zoo
    meta = {"name": "m", "caffemodel": "m.caffemodel", "caffemodel_url": [url],
            "sha256": hashlib.sha256(payload).hexdigest(), **meta}
    return zoo.Entry("m", tmp_path / "zoo" / "m", meta)


def test_zoo_downloads_verify_tls_certificates(tmp_path, monkeypatch):
    from protonet import zoo
    payload = b"weights" * 1000
    tls = _self_signed(tmp_path)
    cache = tmp_path / "cache"
    with _Server({"/m.caffemodel": payload}, tls) as server:
        entry = _zoo_entry(tmp_path, payload, f"{server.base}/m.caffemodel")
        with pytest.raises(ProtonetError, match="CERTIFICATE_VERIFY_FAILED|certificate verify"):
            zoo.download(entry, cache, progress=False)
        assert not list(cache.rglob("*.caffemodel"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))      # now the certificate is trusted
        assert zoo.download(entry, cache, progress=False).read_bytes() == payload


def test_zoo_weights_are_verified_before_every_use(tmp_path):
    from protonet import zoo
    payload = b"weights" * 1000
    cache = tmp_path / "cache"
    with _Server({"/m.caffemodel": payload}) as server:
        entry = _zoo_entry(tmp_path, payload, f"{server.base}/m.caffemodel")
        path = zoo.ensure_weights(entry, cache)
    path.write_bytes(payload[:-1] + b"!")                  # changed in the cache
    with pytest.raises(ProtonetError, match="sha256 is .*the published one is"):
        zoo.ensure_weights(entry, cache)


def test_zoo_names_and_members_cannot_leave_the_cache(tmp_path):
    import io
    import tarfile
    from protonet import zoo
    for bad in ("../x", "/etc/x", "a/b", ".hidden", "..", ""):
        with pytest.raises(ProtonetError, match="invalid"):
            zoo.check_name(bad)
    entry = zoo.Entry("m", tmp_path, {"name": "m", "caffemodel": "../../escape.caffemodel"})
    with pytest.raises(ProtonetError, match="invalid caffemodel file name"):
        zoo.weights_path(entry, tmp_path / "cache")
    with pytest.raises(ProtonetError, match="invalid path component"):
        zoo._parse_sdist("pypi-sdist://pkg==1.0/models/../../escape.caffemodel")
    # An sdist whose wanted member is a symlink out of the archive: not followed.
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("pkg-1.0/models/m.caffemodel")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        data = tarfile.TarInfo("pkg-1.0/../../outside.caffemodel")
        data.size = 3
        tar.addfile(data, io.BytesIO(b"abc"))
    with pytest.raises(zoo.Unreachable, match="has no file 'models/m.caffemodel'"):
        with zoo._open_member(archive, "models/m.caffemodel", "pypi-sdist://pkg==1.0/x"):
            pass
    assert not (tmp_path.parent / "outside.caffemodel").exists()


def test_zoo_refuses_a_redirect_from_https_to_http(tmp_path, monkeypatch):
    from protonet import zoo
    payload = b"weights" * 1000
    tls = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    with _Server({"/m.caffemodel": payload}) as plain, \
            _Server({"/m.caffemodel": ("redirect", f"{plain.base}/m.caffemodel")},
                    tls) as secure:
        entry = _zoo_entry(tmp_path, payload, f"{secure.base}/m.caffemodel")
        with pytest.raises(ProtonetError):
            zoo.download(entry, tmp_path / "cache", progress=False)
