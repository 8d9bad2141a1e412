"""`protonet sweep`: train a solver several times with some fields changed, and keep
the best. See protonet.sweep for the trials, their folders and how they are scored."""
from __future__ import annotations

import shlex


def register(sub) -> None:
    p = sub.add_parser("sweep", help="hyperparameter sweep over solver fields",
                       description="Train trials of a solver with grid or random field "
                                   "values, each in its own process and folder; print "
                                   "their best test scores and write the winning solver.")
    p.add_argument("--solver", required=True, help="solver prototxt to start from")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                   help="values to try, every combination (repeat for more fields)")
    p.add_argument("--random", action="append", default=[],
                   metavar="FIELD=LOW:HIGH[:log]",
                   help="a value drawn per trial from [LOW, HIGH] (repeat for more fields)")
    p.add_argument("--log-uniform", "--log_uniform", dest="log_uniform",
                   action="store_true", help="draw --random values uniformly in log space")
    p.add_argument("--trials", type=int, help="how many trials (default: one per grid "
                                              "point; needed for --random alone)")
    p.add_argument("--parallel", type=int, default=1, metavar="P",
                   help="trials running at once, each its own process (default 1)")
    p.add_argument("--out", default="sweep", metavar="DIR",
                   help="folder for trial_K/ folders, results.json and "
                        "best.solver.prototxt (default: sweep)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--metric", help="test output to score by, NAME or NAME#k (default: "
                                    "accuracy, else an output named *acc*, else *loss*)")
    p.add_argument("--goal", choices=("max", "min"),
                   help="maximize or minimize the metric (default: min for a loss)")
    p.add_argument("--test-net", "--test_net", dest="test_net", type=int, default=0,
                   help="which test net's outputs to score (default 0)")
    p.add_argument("--weights", help="passed to each trial's train (fine-tuning)")
    p.add_argument("--gpu", help="GPU id(s) for the trials: with several, each running "
                                 "trial slot gets the next one")
    p.add_argument("--train-args", "--train_args", dest="train_args", default="",
                   help="more `protonet train` flags for every trial, as one string: "
                        "--train-args='--ema 0.999'")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import sweep
    gpus = [g for g in (args.gpu or "").split(",") if g.strip()]
    options = sweep.Options(
        solver=args.solver, grid=args.grid, random=args.random,
        log_uniform=args.log_uniform, trials=args.trials, parallel=args.parallel,
        out=args.out, seed=args.seed, metric=args.metric, goal=args.goal,
        test_net=args.test_net, weights=args.weights, gpus=gpus,
        train_args=shlex.split(args.train_args))
    result = sweep.sweep(options)
    print(sweep.table(result))
    return 0 if result.best is not None else 1
