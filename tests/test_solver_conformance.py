"""Training trajectories against the real Caffe (../shared/conformance/solvers).

Each config runs 25 iterations from Caffe's starting weights; after every iteration
the loss and every learnable param must match Caffe's within the README tolerance.
Resuming from Caffe's own snapshot at iteration 10 (as written, and re-laid out as
an HDF5 solver state) must reproduce rows 10..24.
"""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conformance import ROOT, assert_close, folder
from protonet.io.upgrade import read_solver
from protonet.solver import Solver, get_solver
from protonet.solver.snapshot import read_state

CONFIGS = sorted(p.name[:-len(".solver.prototxt")]
                 for p in (ROOT / "solvers").glob("*.solver.prototxt")) or ["(none)"]


def _solver_param(name: str):
    param = read_solver(f"{name}.solver.prototxt")
    param.snapshot = 0                     # the fixture folder is read-only
    param.snapshot_after_train = False
    return param


def _check_row(solver: Solver, ref, i: int, where: str) -> None:
    loss = np.asarray(solver.net.blobs["loss"].data).reshape(())
    assert_close(loss, ref["loss"][i], f"{where}: loss at iteration {i}")
    for key in ref.files:
        if key.startswith("param/"):
            _, layer, k = key.split("/")
            ours = solver.net.params[layer][int(k)].data
            assert_close(ours, ref[key][i], f"{where}: {key} after iteration {i}")


@pytest.mark.parametrize("name", CONFIGS)
def test_trajectory_matches_caffe(name, monkeypatch):
    monkeypatch.chdir(folder("solvers"))
    if name == "(none)":
        pytest.skip("no solver configs in the fixtures")
    param = _solver_param(name)
    param.weights.append(param.net.replace(".prototxt", "_init.caffemodel"))
    solver = get_solver(param)
    ref = np.load(f"{name}.npz")
    for i in range(len(ref["loss"])):
        solver.step(1)
        _check_row(solver, ref, i, name)
    assert solver.iter == len(ref["loss"])


def test_resume_from_caffe_solverstate(monkeypatch):
    monkeypatch.chdir(folder("solvers"))
    solver = get_solver(_solver_param("sgd_resume"))
    solver.restore("snap/sgd_resume_iter_10.solverstate")
    assert (solver.iter, solver.current_step) == (10, 1)
    ref = np.load("sgd_resume.npz")
    for i in range(10, len(ref["loss"])):
        solver.step(1)
        _check_row(solver, ref, i, "sgd_resume (restored)")


def test_resume_from_caffe_state_in_hdf5_layout(monkeypatch, tmp_path):
    """Caffe's snapshot re-written in the layout Caffe's HDF5 snapshots use."""
    fixtures = folder("solvers")
    state = read_state(str(fixtures / "snap/sgd_resume_iter_10.solverstate"))
    path = tmp_path / "sgd_resume_iter_10.solverstate.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("iter", data=np.array([state.iter], dtype=np.int32))
        f["learned_net"] = np.bytes_(str(fixtures / state.learned_net))
        f.create_dataset("current_step", data=np.array([state.current_step], dtype=np.int32))
        for i, blob in enumerate(state.history):
            f.create_dataset(f"history/{i}", data=blob)
    monkeypatch.chdir(fixtures)
    solver = get_solver(_solver_param("sgd_resume"))
    solver.restore(str(path))
    ref = np.load("sgd_resume.npz")
    for i in range(10, len(ref["loss"])):
        solver.step(1)
        _check_row(solver, ref, i, "sgd_resume (restored from HDF5)")
