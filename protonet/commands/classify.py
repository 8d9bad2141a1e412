"""`protonet classify`: top-k classes of images under a zoo model or any deploy net.

A zoo name brings its weights (downloaded and verified on first use), preprocessing
and labels; a deploy.prototxt needs --weights, and its preprocessing comes from the
flags (by default: resize to the net's input, no mean, scale 1).
"""
from __future__ import annotations

import os

from .. import zoo
from ..errors import ProtonetError


def register(sub) -> None:
    p = sub.add_parser("classify", help="classify images with a zoo model or deploy net",
                       description="Print the top-k classes of each image, preprocessed "
                                   "as Caffe's classifier does.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5, help="classes to print (default 5)")
    p.add_argument("--oversample", action="store_true",
                   help="average the outputs of 10 crops: the 4 corners and the center "
                        "of the resized image, and their mirrors (pycaffe's oversample)")
    add_model_arguments(p)
    p.set_defaults(func=run)


def add_model_arguments(p, labels_help: str = "label file, one per line (e.g. "
                        "synset_words.txt)",
                        image_size_help: str = "resize to H[,W] before the center crop") -> None:
    """The flags that choose a model and its preprocessing (`detect`, `segment` and
    `serve` share them)."""
    p.add_argument("--model", required=True, help="zoo model name or deploy.prototxt")
    p.add_argument("--weights", help="caffemodel (or zoo:NAME); default: the zoo model's")
    p.add_argument("--labels", help=labels_help)
    p.add_argument("--gpu", nargs="?", const="0", help="run on GPU ID (default 0)")
    p.add_argument("--mean-value", help="B,G,R means to subtract (overrides the model's)")
    p.add_argument("--scale", type=float, help="multiply after mean subtraction")
    p.add_argument("--image-size", help=image_size_help)
    p.add_argument("--cache-dir", help="weights cache (default: $PROTONET_CACHE or "
                                       "~/.cache/protonet)")


def run(args) -> int:
    _check_files(args)
    from .. import classify
    from ..device import select_device
    model = model_from_args(args)
    results = classify.classify(model, args.images, args.top_k,
                                device=select_device(args.gpu), oversample=args.oversample)
    for path, top in zip(args.images, results):
        print(path)
        for rank, (index, score, label) in enumerate(top, 1):
            print(f"  {rank}. {score:.6f}  {index:>5}" + (f"  {label}" if label else ""))
    return 0


def _check_files(args) -> None:
    """The files named on the command line exist, before torch and the net load."""
    files = [("--labels", args.labels)]
    if os.path.exists(args.model) or args.model.endswith(".prototxt"):
        files.append(("--model", args.model))
    files += [("--weights", w.strip()) for w in (args.weights or "").split(",")
              if w.strip() and not w.strip().startswith("zoo:")]
    for what, path in files:
        if path and not os.path.exists(path):
            raise ProtonetError(f"{what} {path}: no such file")
    for image in args.images:
        if not os.path.isfile(image):
            raise ProtonetError(f"{image}: no such image file")


def model_from_args(args, family=None):
    """The zoo entry or deploy file the flags name, with their preprocessing, as a
    `family.Model` (protonet.classify's by default; protonet.detect's for detectors)."""
    if family is None:
        from .. import classify as family
    if os.path.exists(args.model) or args.model.endswith(".prototxt"):
        if not args.weights:
            raise ProtonetError(f"--model {args.model} is a file: give its --weights too")
        model = family.Model(args.model, zoo.resolve_weights(args.weights, args.cache_dir),
                             zoo.Preprocess(None, None, ()))
    else:
        model = family.zoo_model(args.model, args.weights, args.cache_dir)
    if args.labels:
        model.labels = family.read_labels(args.labels)
    model.preprocess = _overridden(model.preprocess, args)
    return model


def _overridden(prep: zoo.Preprocess, args) -> zoo.Preprocess:
    try:
        mean = tuple(float(v) for v in args.mean_value.split(",")) \
            if args.mean_value else prep.mean
        size = [int(v) for v in args.image_size.split(",")] if args.image_size else None
    except ValueError:
        raise ProtonetError("--mean-value takes numbers like 104,117,123 and --image-size "
                            "a size like 256 or 256,256") from None
    return zoo.Preprocess(image_size=(size[0], size[-1]) if size else prep.image_size,
                          crop=prep.crop, mean=mean,
                          scale=args.scale if args.scale is not None else prep.scale,
                          channel_order=prep.channel_order)
