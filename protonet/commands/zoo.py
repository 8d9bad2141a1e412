"""`protonet zoo list|info|download|verify|path`: the model zoo from the shell.

Weights go to the cache (~/.cache/protonet, $PROTONET_CACHE or --cache-dir) and are
checked against the published checksum before anything uses them.
"""
from __future__ import annotations

import argparse

from .. import zoo
from ..errors import ProtonetError


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", help="weights cache (default: $PROTONET_CACHE or "
                                            "~/.cache/protonet)")
    p = sub.add_parser("zoo", help="list, download and verify published models",
                       description="Published Caffe models: prototxts in protonet/model_zoo/, "
                                   "weights downloaded into a verified cache.")
    actions = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    actions.add_parser("list", parents=[common], help="the models and whether they are "
                       "downloaded").set_defaults(func=_list)
    for name, func, text in (("info", _info, "a model's details and files"),
                             ("verify", _verify, "check the downloaded weights' checksum"),
                             ("path", _path, "print the downloaded weights' path")):
        q = actions.add_parser(name, parents=[common], help=text)
        q.add_argument("name", metavar="NAME")
        q.set_defaults(func=func)
    d = actions.add_parser("download", parents=[common], help="download a model's weights")
    d.add_argument("name", metavar="NAME")
    d.add_argument("--url", help="download from this URL (a mirror) instead")
    d.add_argument("--no-verify", action="store_true",
                   help="skip the checksum (required where none is published)")
    d.add_argument("--force", action="store_true", help="download again even if cached")
    d.set_defaults(func=_download)


def _list(args) -> int:
    rows = [("NAME", "PARAMS", "WEIGHTS", "LICENSE", "TITLE")]
    for entry in zoo.entries():
        params = f"{entry.params / 1e6:.2f}M" if entry.params else "?"
        cached = "cached" if zoo.weights_path(entry, args.cache_dir).is_file() else "-"
        rows.append((entry.name, params, cached, str(entry.meta.get("license", "?")),
                     entry.title))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    return 0


def _info(args) -> int:
    entry = zoo.load_entry(args.name)
    for key, value in entry.meta.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key}: {shown}")
    for kind in ("deploy", "train_val", "solver"):
        path = entry.prototxt(kind)
        if path is not None:
            print(f"{kind}: {path}")
    path = zoo.weights_path(entry, args.cache_dir)
    print(f"weights: {path} ({'downloaded' if path.is_file() else 'not downloaded'})")
    return 0


def _download(args) -> int:
    entry = zoo.load_entry(args.name)
    path = zoo.download(entry, args.cache_dir, url=args.url,
                        verify_checksum=not args.no_verify, force=args.force)
    print(path)
    return 0


def _verify(args) -> int:
    algorithm, digest = zoo.verify(zoo.load_entry(args.name), args.cache_dir)
    print(f"{args.name}: OK ({algorithm} {digest})")
    return 0


def _path(args) -> int:
    entry = zoo.load_entry(args.name)
    path = zoo.weights_path(entry, args.cache_dir)
    if not path.is_file():
        raise ProtonetError(f"{entry.name}: not downloaded (it would be at {path}); "
                                f"run `protonet zoo download {entry.name}`")
    print(path)
    return 0
