"""`protonet export`: a deploy net with its weights as ONNX and/or TorchScript."""
from __future__ import annotations

import logging

from ..errors import ProtonetError
from ..io.upgrade import read_net

log = logging.getLogger("protonet")


def register(sub) -> None:
    p = sub.add_parser("export", help="export a deploy net to ONNX or TorchScript",
                       description="Trace a deploy net (Input layers) at its input shapes "
                       "and write it as ONNX and/or TorchScript.")
    p.add_argument("--model", required=True, help="deploy net prototxt")
    p.add_argument("--weights", help="trained weights (.caffemodel or .h5); without, "
                   "the fillers' initial values are exported")
    p.add_argument("--onnx", metavar="OUT.onnx", help="write an ONNX model here")
    p.add_argument("--torchscript", metavar="OUT.pt", help="write a TorchScript module here")
    p.add_argument("--opset", type=int, help="ONNX opset version (default: torch's)")
    p.add_argument("--onnx-exporter", choices=["dynamo", "torchscript"],
                   help="torch's ONNX exporter: torch.export-based (dynamo, needs "
                   "onnxscript) or TorchScript-based (default: dynamo when onnxscript "
                   "is installed)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not args.onnx and not args.torchscript:
        raise ProtonetError("nothing to write: give --onnx OUT.onnx and/or "
                            "--torchscript OUT.pt")
    read_net(args.model)            # a missing or broken file fails before torch loads
    from ..export import export_onnx, export_torchscript, to_torch
    from ..pycaffe import TEST, Net
    if not args.weights:
        log.warning("no --weights given: exporting the fillers' initial values")
    model = to_torch(Net(args.model, TEST, weights=args.weights))
    log.info("Inputs %s, outputs %s", model.input_names, model.output_names)
    if args.torchscript:
        export_torchscript(model, args.torchscript)
        log.info("Wrote TorchScript %s", args.torchscript)
    if args.onnx:
        dynamo = None if args.onnx_exporter is None else args.onnx_exporter == "dynamo"
        export_onnx(model, args.onnx, args.opset, dynamo)
        log.info("Wrote ONNX %s", args.onnx)
    return 0
