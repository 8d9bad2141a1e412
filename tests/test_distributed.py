"""Data-parallel training (protonet.solver.distributed) on the CPU with gloo.

The contract, Caffe's: N workers with batch_size B make the same updates as one
worker with iter_size N, when worker r's batch of an iteration holds what that
worker's sub-batch r would. The data here are written so that it does: the
single run reads A in order; the workers read D, in which record 2*(k*B + j) + r
is A[(2k + r)*B + j], and Caffe's Skip() deals record i to worker i % 2.

Every multi-process run has a deadline and is ended (its whole process group)
when it overruns or the test fails; children run with OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import lmdb
import numpy as np
import pytest
import torch

import protonet
from protonet.data.datum import raw_datum
from protonet.io.text import parse_text
from protonet.io.weights import blob_to_array, read_weights
from protonet.proto import caffe_pb2
from protonet.solver import distributed, get_solver
from protonet.solver.snapshot import read_state
from workers import run_workers

REPO = Path(__file__).resolve().parents[1]
TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
B, ROWS, FEATURES, CLASSES, ITERS = 4, 24, 5, 3, 7
DEADLINE_S = 60

NET = """
name: "dp"
layer {{ name: "data" type: "{kind}" top: "data" top: "label" include {{ phase: TRAIN }}
  {train} }}
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label" include {{ phase: TEST }}
  hdf5_data_param {{ source: "test.txt" batch_size: 5 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 6 weight_filler {{ type: "gaussian" std: 0.5 }}
                         bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param {{ lr_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
layer {{ name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc"
  include {{ phase: TEST }} }}
"""

SOLVER = """net: "{net}" base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"
max_iter: {iters} display: 1 test_iter: 2 test_interval: 3 snapshot: 4
snapshot_prefix: "{prefix}" random_seed: 5 iter_size: {iter_size}
"""


# --- data -------------------------------------------------------------------------------

def _examples(seed: int = 0):
    rng = np.random.default_rng(seed)
    features = rng.integers(0, 256, (ROWS, FEATURES)).astype(np.uint8)
    labels = rng.integers(0, CLASSES, ROWS)
    return features, labels


def _interleaved(n: int, workers: int = 2) -> list[int]:
    """Order of D: worker r's j-th record of iteration k is A's sub-batch r's j-th."""
    order = []
    for k in range(n // (workers * B)):
        for j in range(B):
            for r in range(workers):
                order.append((workers * k + r) * B + j)
    return order


def _write_h5(path: Path, features, labels, order) -> None:
    with h5py.File(path, "w") as f:
        f["data"] = features[order].astype(np.float32) / 255
        f["label"] = labels[order].astype(np.float32)


def _write_lmdb(path: Path, features, labels, order) -> None:
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for key, i in enumerate(order):
            image = features[i].reshape(1, 1, FEATURES)               # H, W, C
            datum = raw_datum(image, int(labels[i]))
            txn.put(f"{key:08d}".encode(), datum.SerializeToString())
    env.close()


def _setup(folder: Path, kind: str) -> None:
    """net_a/solver_a (one worker, iter_size 2, A) and net_d/solver_d (iter_size 1, D)."""
    features, labels = _examples()
    order_a, order_d = list(range(ROWS)), _interleaved(ROWS)
    test_features, test_labels = _examples(seed=1)
    _write_h5(folder / "test.h5", test_features, test_labels, list(range(10)))
    (folder / "test.txt").write_text("test.h5\n")
    (folder / "snap").mkdir()
    (folder / "ref").mkdir()
    for name, order in (("a", order_a), ("d", order_d)):
        if kind == "HDF5Data":
            _write_h5(folder / f"train_{name}.h5", features, labels, order)
            (folder / f"train_{name}.txt").write_text(f"train_{name}.h5\n")
            train = f'hdf5_data_param {{ source: "train_{name}.txt" batch_size: {B} }}'
        else:
            _write_lmdb(folder / f"train_{name}_lmdb", features, labels, order)
            train = (f'data_param {{ source: "train_{name}_lmdb" batch_size: {B} '
                     'backend: LMDB } transform_param { scale: 0.00392156862 }')
        (folder / f"net_{name}.prototxt").write_text(NET.format(kind=kind, train=train))
    (folder / "solver_a.prototxt").write_text(
        SOLVER.format(net="net_a.prototxt", iters=ITERS, prefix="ref/dp", iter_size=2))
    (folder / "solver_d.prototxt").write_text(
        SOLVER.format(net="net_d.prototxt", iters=ITERS, prefix="snap/dp", iter_size=1))


def _reference(folder: Path, monkeypatch):
    """The one-worker run with iter_size 2: its params and momentum history."""
    monkeypatch.chdir(folder)
    solver = get_solver("solver_a.prototxt")
    solver.step(ITERS)
    params = [p.detach().numpy().copy() for p in solver._params]
    history = [h.detach().numpy().copy() for h in solver._rule.history]
    protonet.data.layers.close_data_layers(solver.train_module)
    return params, history


def _snapshot_params(path: Path) -> list[np.ndarray]:
    net = read_weights(str(path))
    return [blob_to_array(blob) for layer in net.layer for blob in layer.blobs]


# --- running processes with a deadline -------------------------------------------------------

def _child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    for key in distributed.ENV_KEYS + ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def _run(command: list[str], cwd: Path, timeout: float = DEADLINE_S):
    """Run `command` in its own session; on overrun end the whole group."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=_child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{' '.join(command)} overran {timeout} s:\n{err[-4000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        try:        # stray workers of a failed run
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return process.returncode, out, err, time.monotonic() - started


def _check_equivalent(folder: Path, reference, err: str) -> None:
    params, history = reference
    model = folder / f"snap/dp_iter_{ITERS}.caffemodel"
    assert model.exists(), err[-4000:]
    got = _snapshot_params(model)
    assert len(got) == len(params) == 4
    for mine, theirs in zip(got, params):
        np.testing.assert_allclose(mine, theirs, rtol=2e-5, atol=2e-6)
    assert not np.allclose(got[0], _snapshot_params(folder / "snap/dp_iter_4.caffemodel")[0])
    state = read_state(str(folder / f"snap/dp_iter_{ITERS}.solverstate"))
    assert state.iter == ITERS
    for mine, theirs in zip(state.history, history):
        np.testing.assert_allclose(mine.reshape(theirs.shape), theirs, rtol=2e-5, atol=2e-6)


def _check_single_writer(folder: Path, err: str) -> None:
    """Rank 0 alone logs at INFO, tests, snapshots and writes the JSON log."""
    assert err.count("Snapshotting to binary proto file snap/dp_iter_4.caffemodel") == 1
    assert err.count("Solving dp") == 1
    assert "Data-parallel training on 2 workers (gloo)" in err
    records = [json.loads(line) for line in
               (folder / "snap/dp.log.jsonl").read_text().splitlines()]
    train = [r["iter"] for r in records if r["event"] == "train"]
    tests = [r["iter"] for r in records if r["event"] == "test"]
    assert train == list(range(ITERS))
    assert tests == [0, 3, 6]
    assert sorted(p.name for p in (folder / "snap").iterdir()) == [
        "dp.log.jsonl", "dp_iter_4.caffemodel", "dp_iter_4.solverstate",
        "dp_iter_7.caffemodel", "dp_iter_7.solverstate"]


# --- the equivalence, end to end -----------------------------------------------------------

def test_two_cpu_workers_match_iter_size_two(tmp_path, monkeypatch):
    """`protonet train --workers 2` (two gloo processes, HDF5 rows sharded)."""
    _setup(tmp_path, "HDF5Data")
    reference = _reference(tmp_path, monkeypatch)
    code, out, err, seconds = _run([sys.executable, "-m", "protonet", "train", "--solver",
                                    "solver_d.prototxt", "--workers", "2"], tmp_path)
    assert code == 0, err[-4000:]
    _check_equivalent(tmp_path, reference, err)
    _check_single_writer(tmp_path, err)
    assert seconds < DEADLINE_S


def test_torchrun_workers_match_iter_size_two_on_lmdb(tmp_path, monkeypatch):
    """Two workers started by torchrun (static rendezvous on 127.0.0.1), LMDB records."""
    _setup(tmp_path, "Data")
    reference = _reference(tmp_path, monkeypatch)
    port = distributed.free_port()
    code, out, err, seconds = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
         "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "protonet", "train", "--solver", "solver_d.prototxt"], tmp_path)
    assert code == 0, err[-4000:]
    _check_equivalent(tmp_path, reference, err)
    _check_single_writer(tmp_path, err)


def test_a_failing_worker_ends_the_others(tmp_path):
    """A worker that fails makes `train` exit nonzero, with its error, and no hang."""
    _setup(tmp_path, "HDF5Data")
    # Worker 1 alone finds its data missing... every worker reads the same list, so
    # break the list for both and check the one-line error and the exit status.
    (tmp_path / "train_d.txt").write_text("missing.h5\n")
    code, out, err, seconds = _run([sys.executable, "-m", "protonet", "train", "--solver",
                                    "solver_d.prototxt", "--workers", "2"], tmp_path)
    assert code == 1
    assert "protonet train: error: (worker" in err and "missing.h5" in err
    assert "Traceback" not in err


# --- the solver's side, in spawned processes ------------------------------------------------

def _api_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One worker through the Python API: records what it wrote, tested and holds."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    os.chdir(folder)
    import protonet.solver.solver as solver_module
    writes, tests = [], []
    save = solver_module.save_caffemodel

    def counting_save(module, path, **options):
        writes.append(path)
        return save(module, path, **options)

    solver_module.save_caffemodel = counting_save
    distributed.init(torch.device("cpu"), timeout=30)
    try:
        solver = get_solver("solver_d.prototxt", log_json="api.jsonl")
        test = solver.test
        solver.test = lambda index=0: tests.append(solver.iter) or test(index)
        # Rank 0's handler alone asks to stop, during iteration 4: every worker stops
        # after that iteration's update, at iter 5.
        calls = [0]

        def action():
            calls[0] += 1
            return "stop" if rank == 0 and solver.iter == 4 else "none"

        solver.action = action
        solver.solve()
        params = [p.detach().numpy() for p in solver._params]
        np.savez(f"rank{rank}.npz", *params)
        Path(f"rank{rank}.json").write_text(json.dumps(
            {"writes": writes, "tests": tests, "iter": solver.iter,
             "snapshot": solver.snapshot(), "json": solver._json is not None}))
    finally:
        distributed.shutdown()


def test_workers_agree_and_only_rank_0_writes_or_tests(tmp_path, monkeypatch):
    _setup(tmp_path, "HDF5Data")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # the spawned workers inherit it
    run_workers(_api_worker, str(tmp_path), deadline_s=DEADLINE_S)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Rank 0 stopped at iteration 5 (its handler), and so did rank 1 (told with the
    # gradients); rank 0 alone tested (0 and 3), snapshotted (4, and 5 at the stop).
    assert [r["iter"] for r in results] == [5, 5]
    assert results[0]["tests"] == [0, 3] and results[1]["tests"] == []
    assert results[0]["writes"] == ["snap/dp_iter_4.caffemodel",
                                    "snap/dp_iter_5.caffemodel",
                                    "snap/dp_iter_5.caffemodel"]
    assert results[1]["writes"] == [] and results[1]["snapshot"] == ""
    assert results[0]["json"] and not results[1]["json"]
    # Same params on both workers, bit for bit (one averaged update each iteration).
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for name in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name])


# --- data sharding, in one process ------------------------------------------------------------

@pytest.fixture
def as_worker(monkeypatch):
    """Pretend to be worker `rank` of `world` (what distributed.init records)."""
    def become(rank: int, world: int) -> None:
        monkeypatch.setattr(distributed._state, "rank", rank)
        monkeypatch.setattr(distributed._state, "world", world)
    return become


def _net(text: str, phase: int) -> protonet.Net:
    return protonet.Net(parse_text(text, caffe_pb2.NetParameter()), phase)


def _labels(net: protonet.Net, batches: int) -> list[list[int]]:
    return [net.forward()["label"].reshape(-1).astype(int).tolist() for _ in range(batches)]


def _hdf5_files(folder: Path, sizes: list[int]) -> str:
    start, names = 0, []
    for i, rows in enumerate(sizes):
        with h5py.File(folder / f"f{i}.h5", "w") as f:
            f["data"] = np.zeros((rows, 2), np.float32)
            f["label"] = np.arange(start, start + rows, dtype=np.float32)
        names.append(str(folder / f"f{i}.h5"))
        start += rows
    (folder / "list.txt").write_text("\n".join(names) + "\n")
    return str(folder / "list.txt")


def _hdf5_net(source: str, batch: int, phase: int, shuffle: bool = False) -> protonet.Net:
    return _net(f"""layer {{ name: "h5" type: "HDF5Data" top: "data" top: "label"
      hdf5_data_param {{ source: "{source}" batch_size: {batch}
                         shuffle: {str(shuffle).lower()} }} }}""", phase)


def test_hdf5_rows_are_dealt_as_caffe_skip_across_files(tmp_path, as_worker):
    """Worker r keeps row i of the endless walk when i % N == r, across file ends."""
    sizes, batch, world = [5, 3, 4], 2, 3
    source = _hdf5_files(tmp_path, sizes)
    walk = list(range(sum(sizes)))
    for rank in range(world):
        as_worker(rank, world)
        got = _labels(_hdf5_net(source, batch, TRAIN), 7)
        expected = [[walk[(rank + (k * batch + i) * world) % len(walk)] for i in range(batch)]
                    for k in range(7)]
        assert got == expected, rank
    as_worker(1, world)                       # TEST nets read every row
    assert _labels(_hdf5_net(source, batch, TEST), 2) == [[0, 1], [2, 3]]


def test_shuffled_hdf5_shards_stay_disjoint(tmp_path, as_worker):
    source = _hdf5_files(tmp_path, [6, 6])
    seen = []
    for rank in range(2):
        as_worker(rank, 2)
        distributed.seed(11)      # what the solver does: the shared generator agrees
        seen.append(_labels(_hdf5_net(source, 3, TRAIN, shuffle=True), 8))
    for k in range(8):
        assert not set(seen[0][k]) & set(seen[1][k]), k
    first_epoch = [x for k in range(2) for r in range(2) for x in seen[r][k]]
    assert sorted(first_epoch) == list(range(12))


def test_lmdb_records_are_dealt_as_caffe_skip(tmp_path, as_worker):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(7):
            datum = raw_datum(np.zeros((1, 1, 1), np.uint8), i)
            txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    env.close()
    text = f"""layer {{ name: "d" type: "Data" top: "data" top: "label"
      data_param {{ source: "{tmp_path / 'db'}" batch_size: 3 backend: LMDB }} }}"""
    for rank, expected in ((0, [[0, 2, 4], [6, 1, 3], [5, 0, 2]]),
                           (1, [[1, 3, 5], [0, 2, 4], [6, 1, 3]])):
        as_worker(rank, 2)
        net = _net(text, TRAIN)
        assert _labels(net, 3) == expected
        protonet.data.layers.close_data_layers(net)
    net = _net(text, TEST)
    assert _labels(net, 1) == [[0, 1, 2]]
    protonet.data.layers.close_data_layers(net)


def test_workers_flag_is_checked(tmp_path, monkeypatch):
    from protonet.cli import main
    _setup(tmp_path, "HDF5Data")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--solver", "solver_d.prototxt", "--workers", "0"]) == 1
    for key in distributed.ENV_KEYS:
        monkeypatch.setenv(key, "0" if key == "RANK" else "1" if key == "WORLD_SIZE"
                           else "127.0.0.1" if key == "MASTER_ADDR" else "29999")
    assert main(["train", "--solver", "solver_d.prototxt", "--workers", "2"]) == 1
