"""`protonet draw-net`: a picture of a net's graph, like Caffe's draw_net.py."""
from __future__ import annotations

import logging

from ..draw import draw_net_to_file
from ..io.upgrade import read_net
from ..proto import caffe_pb2

log = logging.getLogger("protonet")


def register(sub) -> None:
    p = sub.add_parser("draw-net", help="draw a net's graph (.dot, or .svg/.png via Graphviz)",
                       description="Draw a net as a graph of layers and blobs. .dot/.gv "
                       "files are written directly; images (.svg, .png, .pdf, ...) are "
                       "rendered with Graphviz's dot program.")
    p.add_argument("net", help="net prototxt")
    p.add_argument("output", help="output file; its extension picks the format")
    p.add_argument("--rankdir", choices=["LR", "TB", "BT", "RL"], default="LR",
                   help="layout direction (default: LR, left to right)")
    p.add_argument("--phase", choices=["TRAIN", "TEST", "ALL"], default="ALL",
                   help="draw the layers of one phase, or ALL layers (default)")
    p.add_argument("--level", type=int, default=0, help="net level, with --phase")
    p.add_argument("--stage", action="append", default=[],
                   help="net stage, with --phase (repeat or comma-separate)")
    p.add_argument("--display-lrm", action="store_true",
                   help="show the lr multipliers of Convolution/InnerProduct layers")
    p.set_defaults(func=run)


def run(args) -> int:
    net = read_net(args.net)
    phase = None if args.phase == "ALL" else getattr(caffe_pb2, args.phase)
    stages = [s for arg in args.stage for s in arg.split(",") if s]
    log.info("Drawing net to %s", args.output)
    draw_net_to_file(net, args.output, args.rankdir, phase, args.level, stages,
                     args.display_lrm)
    return 0
