"""`protonet parse-log` / `plot-log`: training curves from Caffe or protonet logs."""
from __future__ import annotations

import logging

from ..logs import parse_log, plot_logs, save_csv

log = logging.getLogger("protonet")


def register(sub) -> None:
    p = sub.add_parser("parse-log", help="training log to train.csv and test.csv",
                       description="Read a Caffe or protonet training log and write "
                       "train.csv and test.csv (NumIters, Seconds, LearningRate, one "
                       "column per net output), like Caffe's tools/extra/parse_log.py.")
    p.add_argument("log", help="training log (Caffe glog output or protonet's)")
    p.add_argument("--out-dir", default=".", help="where to write the CSV files "
                   "(default: the current directory)")
    p.set_defaults(func=run_parse)
    q = sub.add_parser("plot-log", help="plot training curves of one or more logs",
                       description="Plot loss, test scores and learning rate against "
                       "iterations (needs matplotlib: pip install 'protonet[plot]').")
    q.add_argument("logs", nargs="+", metavar="log", help="training log(s)")
    q.add_argument("--out", default="curves.png",
                   help="image to write; the extension picks the format (default: "
                   "curves.png)")
    q.set_defaults(func=run_plot)


def run_parse(args) -> int:
    parsed = parse_log(args.log)
    train, test = save_csv(parsed, args.out_dir)
    log.info("Wrote %s (%d rows) and %s (%d rows)", train, len(parsed.train), test,
             len(parsed.test))
    return 0


def run_plot(args) -> int:
    plot_logs({path: parse_log(path) for path in args.logs}, args.out)
    log.info("Wrote %s", args.out)
    return 0
