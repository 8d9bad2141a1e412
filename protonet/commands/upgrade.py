"""`protonet upgrade-net` / `upgrade-solver`: rewrite old Caffe files in today's format."""
from __future__ import annotations

import logging

from ..io.binary import read_binary, write_binary
from ..io.text import read_text, write_text
from ..io.upgrade import (net_needs_upgrade, solver_needs_upgrade, upgrade_net,
                          upgrade_solver)
from ..proto import caffe_pb2

log = logging.getLogger("protonet")


def register(sub) -> None:
    p = sub.add_parser("upgrade-net", help="upgrade a V0/V1 net prototxt or caffemodel")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--binary", action="store_true",
                   help="the files are binary (.caffemodel); default: by extension")
    p.set_defaults(func=run_net)
    s = sub.add_parser("upgrade-solver", help="upgrade a solver prototxt (solver_type -> type)")
    s.add_argument("input")
    s.add_argument("output")
    s.set_defaults(func=run_solver)


def _is_binary(args) -> bool:
    return args.binary or args.input.endswith((".caffemodel", ".binaryproto"))


def run_net(args) -> int:
    binary = _is_binary(args)
    net = caffe_pb2.NetParameter()
    (read_binary if binary else read_text)(args.input, net)
    if not net_needs_upgrade(net):
        log.info("%s is already in the current format; writing it unchanged", args.input)
    else:
        net = upgrade_net(net, args.input)
    (write_binary if binary else write_text)(args.output, net)
    log.info("Wrote upgraded NetParameter %s to %s", "binary" if binary else "text",
             args.output)
    return 0


def run_solver(args) -> int:
    solver = read_text(args.input, caffe_pb2.SolverParameter())
    if solver_needs_upgrade(solver):
        solver = upgrade_solver(solver, args.input)
    else:
        log.info("%s is already in the current format; writing it unchanged", args.input)
    write_text(args.output, solver)
    log.info("Wrote upgraded SolverParameter text proto to %s", args.output)
    return 0
