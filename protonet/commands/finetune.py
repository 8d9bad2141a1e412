"""`protonet finetune NAME`: retrain a zoo model's classifier on your LMDBs.

Writes train_val.prototxt and solver.prototxt into --out (plain Caffe files, rerun them
with `protonet train --solver OUT/solver.prototxt`), then trains them unless
--write-only. The pretrained weights come from the zoo cache, downloaded and
verified on first use.
"""
from __future__ import annotations

import logging

from .. import zoo

log = logging.getLogger("protonet")


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a zoo model on your own LMDBs",
                       description="Write a fine-tuning net and solver for a zoo model "
                                   "(new classifier, optional frozen layers) and train it.")
    p.add_argument("name", metavar="NAME", help="zoo model to start from")
    p.add_argument("--train", required=True, metavar="DB", help="training LMDB")
    p.add_argument("--val", required=True, metavar="DB", help="validation LMDB")
    p.add_argument("--num-classes", required=True, type=int, metavar="K")
    p.add_argument("--freeze-through", metavar="LAYER",
                   help="keep this layer and all before it fixed (lr_mult 0)")
    p.add_argument("--lr", type=float, default=0.001, help="base learning rate "
                   "(default 0.001; the new classifier learns 10x faster)")
    p.add_argument("--iterations", type=int, default=1000, help="max_iter (default 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--out", default=None, help="folder for the files and snapshots "
                   "(default: finetune_NAME)")
    p.add_argument("--weights", help="start from this caffemodel instead of the zoo's")
    p.add_argument("--gpu", type=int, default=None, metavar="ID", help="train on this GPU")
    p.add_argument("--write-only", action="store_true", help="write the files, do not train")
    p.add_argument("--cache-dir", help="weights cache (default: $PROTONET_CACHE or "
                                       "~/.cache/protonet)")
    p.set_defaults(func=run)


def run(args) -> int:
    entry = zoo.load_entry(args.name)         # an unknown name fails before torch loads
    from .. import finetune
    from ..device import select_device
    weights = zoo.resolve_weights(args.weights, args.cache_dir) if args.weights else \
        str(zoo.ensure_weights(entry, args.cache_dir))
    options = finetune.Options(args.train, args.val, args.num_classes, args.freeze_through,
                               args.lr, args.iterations, args.batch_size,
                               args.out or f"finetune_{entry.name}", args.gpu)
    solver_path = finetune.write(entry, options, weights)
    log.info("Wrote %s and %s", solver_path.with_name("train_val.prototxt"), solver_path)
    if args.write_only:
        print(f"protonet train --solver {solver_path}")
        return 0
    device = select_device(str(args.gpu) if args.gpu is not None else None)
    finetune.train(solver_path, device)
    return 0
