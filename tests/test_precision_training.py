"""Mixed-precision training and testing: Solver(precision=...), the fp16 loss scaler,
and `protonet train/test --precision`.

A tiny conv net learns which quadrant of an 8x8 image is bright, from HDF5, in a
temporary folder; the whole file takes a few seconds on the CPU (torch's CPU autocast
runs both bf16 and fp16).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from protonet.cli import main as cli_main
from protonet.errors import SolverError
from protonet.io.text import parse_text
from protonet.proto import caffe_pb2
from protonet.solver import distributed, get_solver
from protonet.solver.loss_scale import LossScaler
from protonet.solver.snapshot import read_state
from workers import run_workers

ROWS, SIDE, CLASSES = 48, 8, 4

NET = """
name: "quadrants"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "train.txt" batch_size: 8 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1
                      weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include { phase: TEST } }
"""

SOLVER = """net: "net.prototxt"
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "fixed"
max_iter: {max_iter}
display: {display}
average_loss: 10
iter_size: {iter_size}
test_iter: 2
test_interval: {test_interval}
snapshot_prefix: "snap/q"
snapshot_after_train: false
random_seed: 3
"""


def solver_text(max_iter=30, display=0, iter_size=1, test_interval=1000) -> str:
    return SOLVER.format(max_iter=max_iter, display=display, iter_size=iter_size,
                         test_interval=test_interval)


def param(**fields) -> caffe_pb2.SolverParameter:
    return parse_text(solver_text(**fields), caffe_pb2.SolverParameter())


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The quadrant images as HDF5, the net and a snapshot folder; the cwd."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.arange(ROWS) % CLASSES
    images = rng.normal(0, 0.3, size=(ROWS, 1, SIDE, SIDE)).astype(np.float32)
    half = SIDE // 2
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, 0, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.0
    with h5py.File("data.h5", "w") as f:
        f["data"] = images
        f["label"] = labels.astype(np.float32)
    Path("train.txt").write_text("data.h5\n")
    Path("net.prototxt").write_text(NET)
    Path("snap").mkdir()
    return tmp_path


def params_of(solver) -> list[torch.Tensor]:
    return [p.detach().clone() for p in solver.train_module.parameters()]


def fp32_loss(solver) -> float:
    """The train loss of the solver's current params, in float32, over all 48 rows."""
    total = 0.0
    with torch.no_grad():
        for _ in range(ROWS // 8):
            total += float(solver.train_module(solver.net.input_tensors())[1])
    return total / (ROWS // 8)


# -- bf16 --------------------------------------------------------------------------------
def test_mixed_precision_training_tracks_fp32_with_float32_master_weights(work, caplog):
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="protonet"):
            solver = get_solver(param(), precision=precision)
            start = fp32_loss(solver)
            solver.step(30)
        losses[precision] = (start, solver.smoothed_loss, fp32_loss(solver))
        assert (solver.loss_scaler is not None) == (precision == "fp16")
        assert all(p.dtype == torch.float32 for p in solver.train_module.parameters())
        assert all(p.grad.dtype == torch.float32 for p in solver.train_module.parameters())
        said = any(f"Training in {precision} mixed precision" in r.getMessage()
                   for r in caplog.records)
        assert said == (precision != "fp32")
        if precision != "fp32":
            state = read_state(solver.snapshot())
            assert all(h.dtype == np.float32 for h in state.history)
            # the test net shares the float32 params and runs under autocast
            scores = solver.test(0)
            assert 0.0 <= scores["acc"] <= 1.0
            # blobs produced under autocast still read as float32 numpy arrays
            assert solver.net.blobs["conv"].data.dtype == np.float32
    start32, smooth32, end32 = losses["fp32"]
    assert end32 < 0.5 * start32                        # it learned
    for precision in ("bf16", "fp16"):
        start, smooth, end = losses[precision]
        assert start == start32                         # same seed, same fillers
        assert smooth == pytest.approx(smooth32, rel=0.02), precision
        assert end == pytest.approx(end32, rel=0.02), precision


# -- fp16 and the loss scaler -----------------------------------------------------------
def test_fp16_with_iter_size_updates_as_fp32_does(work):
    """Every pass is scaled and the sum unscaled once: the update matches fp32's up
    to half-precision rounding."""
    runs = {}
    for precision in ("fp32", "fp16"):
        solver = get_solver(param(iter_size=2), precision=precision)
        before = params_of(solver)
        solver.step(1)
        runs[precision] = [a - b for a, b in zip(params_of(solver), before)]
        assert solver.iter == 1
    for d32, d16 in zip(runs["fp32"], runs["fp16"]):
        assert d32.abs().max() > 0
        torch.testing.assert_close(d16, d32, rtol=0.02, atol=2e-3 * float(d32.abs().max()))


def test_fp16_overflow_skips_the_update_and_backs_off(work, caplog):
    solver = get_solver(param(), precision="fp16")
    assert solver.loss_scaler.scale == 2.0 ** 16
    solver.step(2)
    assert solver.loss_scaler.scale == 2.0 ** 16       # finite steps: no skip, no growth yet
    before, state_before = params_of(solver), read_state(solver.snapshot())
    solver.loss_scaler.scale = 2.0 ** 126               # fp16 backward overflows
    with caplog.at_level(logging.WARNING, logger="protonet"):
        solver.step(1)                                  # nan_effect stop: no error
    assert solver.iter == 3
    assert solver.loss_scaler.scale == 2.0 ** 125
    for a, b in zip(before, params_of(solver)):
        assert torch.equal(a, b)
    state_after = read_state(solver.snapshot())
    assert state_after.iter == 3
    for a, b in zip(state_before.history, state_after.history):
        np.testing.assert_array_equal(a, b)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped the update of iteration 2" in m and "loss scale now 4.25353e+37" in m
               for m in messages), messages
    assert np.isfinite(solver.smoothed_loss) and solver.smoothed_loss < 10   # unscaled
    solver.loss_scaler.scale = 2.0 ** 16
    solver.step(1)
    assert any(not torch.equal(a, b) for a, b in zip(before, params_of(solver)))


def test_fp16_scale_grows_after_growth_interval_finite_steps(work):
    solver = get_solver(param(), precision="fp16")
    solver.loss_scaler.growth_interval = 3
    solver.step(2)
    assert solver.loss_scaler.scale == 2.0 ** 16
    solver.step(1)
    assert solver.loss_scaler.scale == 2.0 ** 17
    solver.step(3)
    assert solver.loss_scaler.scale == 2.0 ** 18


def test_loss_scaler_alone():
    scaler = LossScaler(init_scale=8.0, growth_interval=2)
    grads = [torch.full((3,), 16.0), torch.full((2, 2), -8.0)]
    assert scaler.unscale(grads)
    assert grads[0].tolist() == [2.0] * 3 and grads[1].flatten().tolist() == [-1.0] * 4
    assert scaler.scale == 8.0 and scaler.finite_steps == 1
    assert scaler.unscale([torch.ones(1)]) and scaler.scale == 16.0
    for bad in (float("inf"), float("-inf"), float("nan")):
        grads = [torch.ones(2), torch.tensor([1.0, bad])]
        assert not scaler.unscale(grads)
        assert grads[0].tolist() == [1.0, 1.0]          # left alone
    assert scaler.scale == 2.0 and scaler.finite_steps == 0
    assert scaler.scale_loss(torch.tensor(1.5)).item() == 3.0
    with pytest.raises(ValueError):
        LossScaler(backoff_factor=1.5)


def _fp16_worker(rank: int, world: int, port: int, folder: str) -> None:
    """One fp16 data-parallel worker; only rank 1's gradients overflow, at iteration 2."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    os.chdir(folder)
    distributed.init(torch.device("cpu"), timeout=30)
    try:
        solver = get_solver(param(), precision="fp16")
        first = next(solver.train_module.parameters())
        first.register_hook(lambda g: g * float("inf")
                            if rank == 1 and solver.iter == 2 else g)
        record = []
        for _ in range(4):
            before = params_of(solver)
            solver.step(1)
            record.append({"iter": solver.iter, "scale": solver.loss_scaler.scale,
                           "updated": any(not torch.equal(a, b) for a, b in
                                          zip(before, params_of(solver)))})
        np.savez(f"rank{rank}.npz", *[p.detach().numpy() for p in params_of(solver)])
        Path(f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        distributed.shutdown()


def test_fp16_workers_skip_together(work, monkeypatch):
    """The finite check runs on the averaged diffs: one worker's overflow makes every
    worker skip that update and back off to the same scale."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_workers(_fp16_worker, str(work))
    records = [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]
    assert records[0] == records[1]
    assert [r["updated"] for r in records[0]] == [True, True, False, True]
    assert [r["scale"] for r in records[0]] == [2.0 ** 16] * 2 + [2.0 ** 15] * 2
    assert [r["iter"] for r in records[0]] == [1, 2, 3, 4]
    ranks = [np.load(work / f"rank{r}.npz") for r in range(2)]
    for name in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name])


# -- errors and the command line --------------------------------------------------------
def test_invalid_precision_is_a_clear_error(work):
    with pytest.raises(SolverError, match=r"precision must be one of fp32, bf16, fp16.*'fp64'"):
        get_solver(param(), precision="fp64")


def _messages(err: str) -> list[str]:
    return [line.split(" ", 2)[2] for line in err.splitlines()
            if re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ", line)]


def test_cli_train_and_test_take_precision(work, capsys):
    Path("solver.prototxt").write_text(solver_text(max_iter=4, display=2, test_interval=4)
                                       .replace('snapshot_after_train: false',
                                                'snapshot_after_train: true'))
    assert cli_main(["train", "--solver", "solver.prototxt", "--precision", "bf16",
                     "--log-json", "log.jsonl"]) == 0
    messages = _messages(capsys.readouterr().err)
    assert any(m.startswith("Training in bf16 mixed precision") for m in messages)
    events = [json.loads(x) for x in Path("log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["test", "train", "train", "test"]
    assert all(np.isfinite(e["loss"]) for e in events if e["event"] == "train")
    assert cli_main(["test", "--model", "net.prototxt", "--weights",
                     "snap/q_iter_4.caffemodel", "--iterations", "2",
                     "--precision", "fp16"]) == 0
    messages = _messages(capsys.readouterr().err)
    assert "Running for 2 iterations in fp16 (autocast)." in messages
    assert sum(m.startswith("Batch ") and ", acc = " in m for m in messages) == 2
    with pytest.raises(SystemExit):
        cli_main(["train", "--solver", "solver.prototxt", "--precision", "fp64"])
    assert "invalid choice: 'fp64'" in capsys.readouterr().err


# -- CUDA (runs where a GPU is present) --------------------------------------------------
def test_configure_cuda_autotunes_and_keeps_float32_exact():
    from protonet.device import configure_cuda
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        configure_cuda()
        assert torch.backends.cudnn.benchmark
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_training_matches_the_cpu(work):
    from protonet.device import configure_cuda
    configure_cuda()
    finals = []
    for device in ("cpu", "cuda"):
        solver = get_solver(param(max_iter=10), torch.device(device))
        solver.solve()
        assert all(p.device.type == device for p in solver.train_module.parameters())
        assert all(h.device.type == device for h in solver._rule.history)
        finals.append([p.cpu() for p in params_of(solver)])
    for cpu, cuda in zip(*finals):
        assert torch.allclose(cpu, cuda, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_learns(work, precision):
    solver = get_solver(param(max_iter=40), torch.device("cuda"), precision=precision)
    before = fp32_loss(solver)
    solver.solve()
    assert all(p.dtype == torch.float32 for p in solver.train_module.parameters())
    assert fp32_loss(solver) < 0.7 * before
    if precision == "fp16":
        assert 1.0 <= solver.loss_scaler.scale <= 2.0 ** 24
