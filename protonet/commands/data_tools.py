"""`protonet convert-imageset` and `protonet compute-image-mean`: Caffe's data tools.

Flags keep Caffe's gflags names (underscores; `--gray`, `--gray=true` and
`--gray=false` all work) so existing scripts port by changing the program name;
dashed spellings are accepted too. The extras (--threads, --seed, --no-progress)
only change speed, repeatability of --shuffle, and output.
"""
from __future__ import annotations

import argparse
import os

from ..errors import DataError


_TRUE = ("true", "t", "1", "yes", "y")
_FALSE = ("false", "f", "0", "no", "n")


def _spellings(name: str) -> list[str]:
    """Caffe's --under_score flag and its --dashed twin."""
    return list(dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"]))


def _add_bool(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    """A switch that also takes gflags' `--name=false` and `--noname` forms.

    The valued forms are registered as whole option strings, so a bare `--name`
    never swallows the positional argument that follows it.
    """
    spellings = _spellings(name)
    parser.add_argument(*spellings, dest=name, action="store_true", help=help_text)
    for value, words in ((True, _TRUE), (False, _FALSE)):
        words = words + tuple(w.capitalize() for w in words if w.isalpha())
        forms = [f"{s}={w}" for s in spellings for w in words]
        if not value:
            forms += [s.replace("--", "--no", 1) for s in spellings]
        parser.add_argument(*forms, dest=name, action="store_const", const=value,
                            help=argparse.SUPPRESS)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="decode threads (default: CPU count, at most 8)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert-imageset", help="write images and labels into an LMDB (Caffe's "
        "convert_imageset)",
        description="Convert a list of images into an LMDB (or LevelDB) of Datum "
        "records that Caffe and protonet read. LIST has lines '<path> <label>'; paths "
        "are appended to ROOT as is (so give ROOT a trailing '/'). Unreadable images "
        "are logged and skipped; DB appears only once complete.")
    convert.add_argument("root", metavar="ROOT", help="folder the list's paths start in")
    convert.add_argument("list_file", metavar="LIST", help="text file of '<path> <label>'")
    convert.add_argument("db", metavar="DB", help="database directory to create")
    for name in ("resize_height", "resize_width"):
        convert.add_argument(*_spellings(name), dest=name,
                             type=int, default=0, metavar="PIXELS",
                             help="resize to this size (both or neither; 0: keep)")
    _add_bool(convert, "gray", "read images as grayscale")
    _add_bool(convert, "shuffle", "shuffle the list before writing")
    convert.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                         help="database kind (leveldb needs the plyvel package)")
    _add_bool(convert, "encoded", "store encoded image files instead of raw pixels")
    convert.add_argument(*_spellings("encode_type"), dest="encode_type",
                         default="", metavar="EXT",
                         help="re-encode as this type (png, jpg, ...); implies --encoded")
    _add_bool(convert, "check_size", "fail unless every image has the same size")
    convert.add_argument("--seed", type=int, default=None,
                         help="seed for --shuffle (default: a fresh random order)")
    _add_common(convert)
    convert.set_defaults(func=_convert)

    mean = subparsers.add_parser(
        "compute-image-mean", help="per-pixel mean of a database (Caffe's "
        "compute_image_mean)",
        description="Average every record of DB (as Caffe does, in float32) and write "
        "the mean as a BlobProto that transform_param.mean_file accepts.")
    mean.add_argument("db", metavar="DB", help="database directory to read")
    mean.add_argument("output", metavar="OUT", nargs="?",
                      help="output .binaryproto (omit to only print channel means)")
    mean.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"))
    _add_common(mean)
    mean.set_defaults(func=_mean)


def _convert(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.list_file):     # before the data machinery (torch) loads
        raise DataError(f"{args.list_file}: image list not found")
    from ..data.imageset import convert_imageset
    result = convert_imageset(
        args.root, args.list_file, args.db, resize_height=args.resize_height,
        resize_width=args.resize_width, gray=args.gray, shuffle=args.shuffle,
        backend=args.backend, encoded=args.encoded, encode_type=args.encode_type,
        check_size=args.check_size, workers=args.threads, seed=args.seed,
        progress=args.progress)
    print(f"wrote {result.written} records to {args.db}; skipped {len(result.skipped)}")
    return 0


def _mean(args: argparse.Namespace) -> int:
    if not os.path.exists(args.db):            # before the data machinery (torch) loads
        raise DataError(f"{args.db}: no such {'LMDB' if args.backend == 'lmdb' else 'LevelDB'}"
                        " database (directory not found)")
    from ..data.imageset import compute_image_mean
    mean = compute_image_mean(args.db, args.output, backend=args.backend,
                              workers=args.threads, progress=args.progress)
    target = f", written to {args.output}" if args.output else ""
    print(f"mean of {args.db}: shape {list(mean.shape)}{target}")
    return 0
