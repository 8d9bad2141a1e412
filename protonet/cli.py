"""The `protonet` command: one subcommand per module in protonet.commands.

Each command module defines `register(subparsers)` which adds its parser and sets
`func`. Errors protonet raises on purpose print as one line (no traceback), exit 1.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
import warnings

from .errors import ProtonetError

# Subcommand modules, in the order `protonet --help` lists them.
COMMANDS = ["train", "test", "time", "device_query", "upgrade", "data_tools", "zoo",
            "finetune", "classify", "detect", "segment", "annoset", "serve", "draw_net",
            "logs", "export", "sweep"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protonet",
        description="Run Caffe models (prototxt, caffemodel, LMDB/HDF5) on PyTorch.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.commands.{name}":
                continue        # a command not built yet
            raise
        module.register(sub)
    return parser


def _version() -> str:
    from . import __version__
    return f"protonet {__version__}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be swapped, e.g. by tests)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    """glog-style lines ('I1123 15:41:51.801 message') on stderr. protonet's logger
    speaks at INFO; other libraries keep the root's level (WARNING)."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(
            "%(levelname).1s%(asctime)s.%(msecs)03d %(message)s", datefmt="%m%d %H:%M:%S"))
        root.addHandler(handler)
    logging.getLogger("protonet").setLevel(logging.WARNING if quiet else logging.INFO)
    warnings.simplefilter("default")
    logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.quiet)
    try:
        return int(args.func(args) or 0)
    except ProtonetError as e:
        print(f"protonet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"protonet {args.command}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `protonet` console command: main(), then a quick exit.

    With torch loaded, the interpreter's own teardown (freeing every module object)
    takes about 0.3 s after the work is done, a fifth of the whole run of a small
    `test` or `classify`. Everything that must outlive the command is finished by
    then (snapshots and logs are written and closed; files are replaced atomically),
    so once the exit handlers have run (logging, data loaders) and the standard
    streams are flushed, the process ends without that teardown."""
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
