"""`protonet convert-annoset`: SSD's convert_annoset (images + VOC XML boxes -> LMDB).

Flags keep the SSD fork's gflags names (underscores, dashed twins accepted), as
`protonet convert-imageset` does for Caffe's tool. Nothing here imports torch.
"""
from __future__ import annotations

import argparse

from .data_tools import _add_bool, _add_common, _spellings


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-annoset", help="write images and their VOC XML boxes into an LMDB of "
        "AnnotatedDatum (SSD's convert_annoset)",
        description="Convert a list of images and PASCAL VOC XML annotations into an "
        "LMDB of AnnotatedDatum records for SSD's AnnotatedData layer. LIST has lines "
        "'<image> <annotation.xml>', both appended to ROOT as is; object names map to "
        "labels through --label_map_file (a LabelMap prototxt).")
    p.add_argument("root", metavar="ROOT", help="folder the list's paths start in")
    p.add_argument("list_file", metavar="LIST", help="text file of '<image> <xml>'")
    p.add_argument("db", metavar="DB", help="database directory to create")
    p.add_argument(*_spellings("label_map_file"), dest="label_map_file", required=True,
                   metavar="FILE", help="LabelMap prototxt: item { name label }")
    p.add_argument(*_spellings("anno_type"), dest="anno_type", default="detection",
                   choices=("detection",), help="annotation kind (detection: boxes)")
    p.add_argument(*_spellings("label_type"), dest="label_type", default="xml",
                   choices=("xml",), help="annotation file format")
    for name in ("resize_height", "resize_width"):
        p.add_argument(*_spellings(name), dest=name, type=int, default=0,
                       metavar="PIXELS", help="resize to this size (both or neither)")
    _add_bool(p, "gray", "read images as grayscale")
    _add_bool(p, "shuffle", "shuffle the list before writing")
    p.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                   help="database kind (leveldb needs the plyvel package)")
    _add_bool(p, "encoded", "store encoded image files instead of raw pixels")
    p.add_argument(*_spellings("encode_type"), dest="encode_type", default="",
                   metavar="EXT", help="re-encode as this type (png, jpg, ...)")
    p.add_argument("--seed", type=int, default=None, help="seed for --shuffle")
    _add_common(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..data.annoset import convert_annoset
    result = convert_annoset(
        args.root, args.list_file, args.db, args.label_map_file,
        resize_height=args.resize_height, resize_width=args.resize_width, gray=args.gray,
        shuffle=args.shuffle, backend=args.backend, encoded=args.encoded,
        encode_type=args.encode_type, workers=args.threads, seed=args.seed,
        progress=args.progress)
    print(f"wrote {result.written} records to {args.db}; skipped {len(result.skipped)}")
    return 0
