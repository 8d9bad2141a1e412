"""Write bench/nets/: the deploy nets bench/bench_caffe.py times, and their *_train twins.

A *_train net is its published deploy net with a training head: the Input layer
becomes DummyData (data from a Gaussian, labels 0: timing needs no real values) with a
label top, and the final Softmax becomes SoftmaxWithLoss on the same scores. BatchNorm
layers lose `use_global_stats: true`, so in TRAIN they normalize with batch
statistics, as training does. Both `caffe time` and `protonet time` read these files.

    python bench/make_train_nets.py        # rewrites bench/nets/*.prototxt
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protonet.io.text import parse_text, read_text, to_text  # noqa: E402
from protonet.proto import caffe_pb2  # noqa: E402

NETS = REPO / "bench" / "nets"
ZOO = REPO / "protonet" / "model_zoo"
# name -> deploy net (a file of the model zoo, or bench/nets/lenet_deploy.prototxt)
DEPLOY = {"alexnet": ZOO / "bvlc_alexnet" / "deploy.prototxt",
          "googlenet": ZOO / "bvlc_googlenet" / "deploy.prototxt",
          "resnet50": ZOO / "resnet_50" / "deploy.prototxt",
          "lenet": NETS / "lenet_deploy.prototxt"}

# LeNet as Caffe's MNIST example defines it (conv 20, pool, conv 50, pool, ip 500,
# ReLU, ip 10), batch 64, with a Softmax on top like the other deploy nets.
LENET = """name: "LeNet"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 64 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 20 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 50 kernel_size: 5 stride: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 500
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 10
    weight_filler { type: "xavier" } bias_filler { type: "constant" } } }
layer { name: "prob" type: "Softmax" bottom: "ip2" top: "prob" }
"""


def train_net(deploy: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """The deploy net with DummyData in, SoftmaxWithLoss out (see the module doc)."""
    net = caffe_pb2.NetParameter()
    net.CopyFrom(deploy)
    net.name = f"{deploy.name}_train"
    first, last = net.layer[0], net.layer[len(net.layer) - 1]
    if first.type != "Input" or len(first.input_param.shape) != 1 or last.type != "Softmax":
        raise SystemExit(f"{deploy.name}: expected an Input layer first and a Softmax last")
    shape = list(first.input_param.shape[0].dim)
    data = caffe_pb2.LayerParameter(name=first.name, type="DummyData",
                                    top=[first.top[0], "label"])
    data.dummy_data_param.shape.add().dim.extend(shape)
    data.dummy_data_param.shape.add().dim.extend(shape[:1])
    data.dummy_data_param.data_filler.add(type="gaussian", std=1.0)
    data.dummy_data_param.data_filler.add(type="constant", value=0.0)
    first.CopyFrom(data)
    loss = caffe_pb2.LayerParameter(name="loss", type="SoftmaxWithLoss",
                                    bottom=[last.bottom[0], "label"], top=["loss"])
    last.CopyFrom(loss)
    for layer in net.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.ClearField("use_global_stats")
    return net


def main() -> int:
    NETS.mkdir(exist_ok=True)
    (NETS / "lenet_deploy.prototxt").write_text(
        "# LeNet deploy net (Caffe's MNIST example architecture), written for protonet's "
        "bench.\n" + to_text(parse_text(LENET, caffe_pb2.NetParameter())))
    for name, path in DEPLOY.items():
        net = train_net(read_text(str(path), caffe_pb2.NetParameter()))
        out = NETS / f"{name}_train.prototxt"
        out.write_text(f"# Made by bench/make_train_nets.py from {path.relative_to(REPO)}: "
                       "DummyData in, SoftmaxWithLoss out.\n" + to_text(net))
        print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
