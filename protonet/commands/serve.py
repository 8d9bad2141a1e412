"""`protonet serve`: a classifier or detector behind an HTTP API and a web page.

The model is loaded before the server starts, so a model that cannot load stops
start-up with the usual one-line error. The socket is bound here (127.0.0.1 unless
--host says otherwise; --port 0 picks a free port) and its URL printed on stdout once
the server accepts requests. SIGTERM stops accepting, lets the requests in flight
finish (up to --drain-timeout seconds) and exits 0; Ctrl-C drains the same way and
exits 130, as every command does on Ctrl-C.

Nothing heavy is imported at module level: Starlette and uvicorn (the `serve` extra)
and torch load when the command runs.
"""
from __future__ import annotations

import logging

log = logging.getLogger("protonet")


def register(sub) -> None:
    from .classify import add_model_arguments
    p = sub.add_parser("serve", help="serve a classifier or detector over HTTP, with a "
                                     "web page",
                       description="Serve a zoo model or deploy net: POST /predict with an "
                                   "image, GET /model, GET /healthz, and a web page at /.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="images per forward pass when requests arrive together (default 8; "
                        "1: every image runs alone)")
    p.add_argument("--max-wait-ms", type=float, default=5,
                   help="how long a request waits for others to share its batch "
                        "(default 5 ms)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32, or bf16/fp16 under autocast")
    p.add_argument("--max-upload-bytes", type=int,
                   help="largest request body (default: protonet.limits, 16 MiB, "
                        "$PROTONET_MAX_UPLOAD_BYTES)")
    p.add_argument("--threshold", type=float,
                   help="detectors: lowest score returned unless a request's ?threshold= "
                        "says otherwise (default: the model's, else 0.5)")
    p.add_argument("--drain-timeout", type=float, default=30,
                   help="seconds to let requests in flight finish on SIGTERM (default 30)")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib.util
    import ipaddress
    import os
    import signal
    import socket
    import sys

    from .. import limits
    from ..errors import ProtonetError
    missing = [name for name, module in (("starlette", "starlette"), ("uvicorn", "uvicorn"),
                                         ("python-multipart", "python_multipart"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ProtonetError(f"serve needs {', '.join(missing)}: pip install "
                            "'protonet[serve]' (or -e '.[serve]' in a checkout)")
    import uvicorn
    if args.max_batch < 1 or args.max_wait_ms < 0:
        raise ProtonetError("--max-batch must be at least 1 and --max-wait-ms at least 0")
    upload = limits.max_upload_bytes() if args.max_upload_bytes is None \
        else args.max_upload_bytes
    if upload < 1:
        raise ProtonetError("--max-upload-bytes must be positive")

    from ..device import select_device
    from ..serve.app import create_app
    from ..serve.predictor import load_predictor
    model = _model(args)
    name = os.path.basename(args.model) if os.path.exists(args.model) else args.model
    predictor = load_predictor(model, name, select_device(args.gpu), args.precision)
    app = create_app(predictor, args.max_batch, args.max_wait_ms, upload)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise ProtonetError(f"cannot listen on {args.host}:{args.port}: "
                            f"{e.strerror}") from None
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
        log.warning("listening on %s: anyone who can reach this machine can use the model",
                    host)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            server_header=False, timeout_graceful_shutdown=args.drain_timeout)
    server = uvicorn.Server(config)
    started = server.startup

    async def startup(sockets=None):
        await started(sockets)
        url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{port}"
        log.info("serving %s (%s, batches of up to %d, %g ms wait) at %s", name,
                 predictor.kind, args.max_batch, args.max_wait_ms, url)
        print(url, flush=True)

    server.startup = startup
    # uvicorn re-raises the signal that stopped it once it has drained; with this
    # handler in place that is a no-op, and a drained SIGTERM exits 0.
    stopped = []
    signal.signal(signal.SIGTERM, lambda sig, frame: stopped.append(sig))
    server.run(sockets=[sock])
    if not server.started:
        raise ProtonetError(f"the server did not start on {host}:{port}")
    sys.stdout.flush()
    return 0


def _model(args):
    """A detect.Model for SSD-style nets (a zoo entry of task detection, or a deploy
    file with a DetectionOutput layer), else a classify.Model."""
    import os

    from .. import zoo
    from ..io.upgrade import read_net
    from . import classify as classify_command
    if os.path.exists(args.model) or args.model.endswith(".prototxt"):
        layers = read_net(args.model).layer
        detector = any(layer.type == "DetectionOutput" for layer in layers)
    else:
        detector = zoo.load_entry(args.model).task == "detection"
    if not detector:
        return classify_command.model_from_args(args)
    from .. import detect
    model = classify_command.model_from_args(args, detect)
    if args.threshold is not None:
        model.threshold = args.threshold
    return model
