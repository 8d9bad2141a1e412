"""parse-log / plot-log read Caffe's glog output and protonet's own logs."""
from __future__ import annotations

import math
import os
import sys
import time

import pytest

from protonet import cli
from protonet.errors import ProtonetError
from protonet.logs import parse_lines, parse_log, plot_logs

# A LeNet run as BVLC Caffe master logs it (display 100, test_interval 200, lr_policy
# inv), glog prefix with thread id and file:line, multi-line parameter dumps included.
CAFFE_LOG = """\
Log file created at: 2016/11/23 10:00:00
Running on machine: trainer
Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg
I1123 10:00:00.118362 12345 caffe.cpp:217] Using GPUs 0
I1123 10:00:00.304615 12345 caffe.cpp:222] GPU 0: GeForce GTX TITAN X
I1123 10:00:00.651024 12345 solver.cpp:48] Initializing solver from parameters: 
test_iter: 100
test_interval: 200
base_lr: 0.01
display: 100
max_iter: 400
lr_policy: "inv"
gamma: 0.0001
power: 0.75
momentum: 0.9
weight_decay: 0.0005
snapshot: 400
snapshot_prefix: "examples/mnist/lenet"
solver_mode: GPU
net: "examples/mnist/lenet_train_test.prototxt"
I1123 10:00:00.651245 12345 solver.cpp:91] Creating training net from net file: examples/mnist/lenet_train_test.prototxt
I1123 10:00:00.651789 12345 net.cpp:322] The NetState phase (0) differed from the phase (1) specified by a rule in layer mnist
I1123 10:00:00.652511 12345 layer_factory.hpp:77] Creating layer mnist
I1123 10:00:00.653040 12345 net.cpp:408] mnist -> data
I1123 10:00:00.654220 12350 db_lmdb.cpp:35] Opened lmdb examples/mnist/mnist_train_lmdb
I1123 10:00:00.668110 12345 data_layer.cpp:41] output data size: 64,1,28,28
I1123 10:00:00.701994 12345 net.cpp:244] This network produces output loss
I1123 10:00:00.702157 12345 net.cpp:257] Network initialization done.
I1123 10:00:00.702340 12345 solver.cpp:60] Solver scaffolding done.
I1123 10:00:00.702652 12345 caffe.cpp:251] Starting Optimization
I1123 10:00:00.702671 12345 solver.cpp:279] Solving LeNet
I1123 10:00:00.702678 12345 solver.cpp:280] Learning Rate Policy: inv
I1123 10:00:00.703420 12345 solver.cpp:337] Iteration 0, Testing net (#0)
I1123 10:00:01.804610 12345 solver.cpp:404]     Test net output #0: accuracy = 0.0847
I1123 10:00:01.804656 12345 solver.cpp:404]     Test net output #1: loss = 2.30576 (* 1 = 2.30576 loss)
I1123 10:00:01.817961 12345 solver.cpp:228] Iteration 0 (-1.4013e-45 iter/s, 1.11524s/100 iters), loss = 2.29454
I1123 10:00:01.818003 12345 solver.cpp:244]     Train net output #0: loss = 2.29454 (* 1 = 2.29454 loss)
I1123 10:00:01.818027 12345 sgd_solver.cpp:106] Iteration 0, lr = 0.01
I1123 10:00:03.125398 12345 solver.cpp:228] Iteration 100 (76.4741 iter/s, 1.30763s/100 iters), loss = 0.216355
I1123 10:00:03.125444 12345 solver.cpp:244]     Train net output #0: loss = 0.216355 (* 1 = 0.216355 loss)
I1123 10:00:03.125463 12345 sgd_solver.cpp:106] Iteration 100, lr = 0.00992565
I1123 10:00:04.431187 12345 solver.cpp:337] Iteration 200, Testing net (#0)
I1123 10:00:05.398742 12345 solver.cpp:404]     Test net output #0: accuracy = 0.9512
I1123 10:00:05.398788 12345 solver.cpp:404]     Test net output #1: loss = 0.159312 (* 1 = 0.159312 loss)
I1123 10:00:05.411530 12345 solver.cpp:228] Iteration 200 (43.4405 iter/s, 2.30202s/100 iters), loss = 0.152097
I1123 10:00:05.411576 12345 solver.cpp:244]     Train net output #0: loss = 0.152097 (* 1 = 0.152097 loss)
I1123 10:00:05.411595 12345 sgd_solver.cpp:106] Iteration 200, lr = 0.00985258
I1123 10:00:06.716020 12345 solver.cpp:228] Iteration 300 (76.6623 iter/s, 1.30442s/100 iters), loss = 0.172536
I1123 10:00:06.716065 12345 solver.cpp:244]     Train net output #0: loss = 0.172536 (* 1 = 0.172536 loss)
I1123 10:00:06.716085 12345 sgd_solver.cpp:106] Iteration 300, lr = 0.00978075
I1123 10:00:08.014437 12345 solver.cpp:454] Snapshotting to binary proto file examples/mnist/lenet_iter_400.caffemodel
I1123 10:00:08.022815 12345 sgd_solver.cpp:273] Snapshotting solver state to binary proto file examples/mnist/lenet_iter_400.solverstate
I1123 10:00:08.027614 12345 solver.cpp:317] Iteration 400, loss = 0.0938352
I1123 10:00:08.027647 12345 solver.cpp:337] Iteration 400, Testing net (#0)
I1123 10:00:08.991520 12345 solver.cpp:404]     Test net output #0: accuracy = 0.9678
I1123 10:00:08.991566 12345 solver.cpp:404]     Test net output #1: loss = 0.10427 (* 1 = 0.10427 loss)
I1123 10:00:08.991574 12345 solver.cpp:322] Optimization Done.
I1123 10:00:08.991580 12345 caffe.cpp:254] Optimization Done.
"""

TRAIN_CSV = """\
NumIters,Seconds,LearningRate,loss
0,1.115332,0.01,2.29454
100,2.422773,0.00992565,0.216355
200,4.708905,0.00985258,0.152097
300,6.013394,0.00978075,0.172536
"""

TEST_CSV = """\
NumIters,Seconds,LearningRate,accuracy,loss
0,1.101939,0.01,0.0847,2.30576
200,4.696071,0.00985258,0.9512,0.159312
400,8.288849,0.00978075,0.9678,0.10427
"""

# protonet's prefix (cli.py's logging format), two test nets, a two-element output,
# and a solve that runs over New Year's night.
PROTONET_LOG = """\
I1231 23:59:58.500 Solving CIFAR10_quick
I1231 23:59:58.500 Learning Rate Policy: multistep
I1231 23:59:58.600 Iteration 0, Testing net (#0)
I1231 23:59:59.000     Test net output #0: accuracy = 0.1
I1231 23:59:59.100 Iteration 0, Testing net (#1)
I1231 23:59:59.400     Test net output #0: accuracy = 0.12
I1231 23:59:59.500 Iteration 0 (0 iter/s, 0.1s/50 iters), loss = 2.3
I1231 23:59:59.500     Train net output #0: loss = 2.3 (* 1 = 2.3 loss)
I1231 23:59:59.500     Train net output #1: scores = 0.25
I1231 23:59:59.500     Train net output #2: scores = 0.75
I1231 23:59:59.501 Iteration 0, lr = 0.001
I0101 00:00:01.250 Iteration 50 (20 iter/s, 2.5s/50 iters), loss = nan
I0101 00:00:01.250     Train net output #0: loss = nan (* 1 = nan loss)
I0101 00:00:01.250     Train net output #1: scores = 0.5
I0101 00:00:01.250     Train net output #2: scores = 0.5
I0101 00:00:01.251 MultiStep Status: Iteration 50, step = 1
I0101 00:00:01.251 Iteration 50, lr = 0.0001
"""


def run_cli(monkeypatch, *argv: str) -> int:
    if "logs" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ["logs"])
    return cli.main(["-q", *argv])


def write_log(tmp_path, text: str, name: str = "caffe.INFO"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_caffe_log_to_csv_like_parse_log(tmp_path, monkeypatch):
    log = write_log(tmp_path, CAFFE_LOG)
    out = tmp_path / "curves"
    assert run_cli(monkeypatch, "parse-log", str(log), "--out-dir", str(out)) == 0
    assert (out / "train.csv").read_text() == TRAIN_CSV
    assert (out / "test.csv").read_text() == TEST_CSV


def test_caffe_log_rows_and_loss_marks(tmp_path):
    parsed = parse_log(str(write_log(tmp_path, CAFFE_LOG)))
    assert [r["NumIters"] for r in parsed.train] == [0, 100, 200, 300]
    assert parsed.losses == {"loss"}
    assert parsed.learning_rates == [(0, 0.01), (100, 0.00992565), (200, 0.00985258),
                                     (300, 0.00978075)]
    assert parsed.is_loss("loss") and not parsed.is_loss("accuracy")


def test_protonet_log_prefix_test_nets_and_repeated_outputs():
    parsed = parse_lines(PROTONET_LOG.splitlines(), year=2016)
    assert parsed.test == [{"NumIters": 0, "Seconds": 0.5, "LearningRate": 0.001,
                            "accuracy": 0.1, "accuracy_net1": 0.12}]
    first, second = parsed.train
    assert first == {"NumIters": 0, "Seconds": 1.0, "LearningRate": 0.001, "loss": 2.3,
                     "scores": 0.25, "scores#2": 0.75}
    assert second["Seconds"] == 2.75 and second["LearningRate"] == 0.0001
    assert math.isnan(second["loss"]) and second["scores#2"] == 0.5


def test_lines_without_prefix_and_feb_29():
    bare = parse_lines(["Iteration 10, Testing net (#0)", "    Test net output #0: acc = 1"])
    assert bare.test[0]["NumIters"] == 10 and math.isnan(bare.test[0]["Seconds"])
    leap = parse_lines(["I0228 23:00:00.000 Solving x", "I0229 00:00:00.000 Iteration 1, "
                        "Testing net (#0)", "I0301 00:00:00.000     Test net output #0: a = 2"],
                       year=2016)
    assert leap.test[0]["Seconds"] == 3600 + 86400


def test_year_comes_from_the_file_time(tmp_path):
    text = ("I1231 12:00:00.000 Solving x\nI0229 12:00:00.000 Iteration 5, Testing net (#0)\n"
            "I0229 12:00:00.000     Test net output #0: a = 1\n")
    path = write_log(tmp_path, text)
    stamp = time.mktime((2016, 3, 1, 12, 0, 0, 0, 0, -1))
    os.utime(path, (stamp, stamp))     # written in 2016, so it began in 2015
    assert parse_log(str(path)).test[0]["Seconds"] == 60 * 86400


def test_logs_without_outputs_are_refused(tmp_path, monkeypatch, capsys):
    log = write_log(tmp_path, "I1123 10:00:00.000 Solving x\nnothing else\n")
    assert run_cli(monkeypatch, "parse-log", str(log)) == 1
    assert "no 'Train net output' or 'Test net output' lines" in capsys.readouterr().err
    with pytest.raises(ProtonetError, match="cannot read"):
        parse_log(str(tmp_path / "missing.log"))


def test_plot_log_writes_an_image(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    first = write_log(tmp_path, CAFFE_LOG, "a.log")
    second = write_log(tmp_path, PROTONET_LOG, "b.log")
    out = tmp_path / "curves.png"
    assert run_cli(monkeypatch, "plot-log", str(first), str(second), "--out", str(out)) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ProtonetError, match="cannot write .xyz"):
        plot_logs({"a": parse_log(str(first))}, str(tmp_path / "curves.xyz"))


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    parsed = parse_lines(CAFFE_LOG.splitlines())
    with pytest.raises(ProtonetError, match=r"pip install 'protonet\[plot\]'"):
        plot_logs({"run": parsed}, str(tmp_path / "c.png"))
