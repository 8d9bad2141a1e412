"""Training curves from solver logs: tables (CSV) and a plot.

Caffe's solver and ours log the same messages (solver.cpp's texts); only the line
prefix differs: glog writes `I1123 10:00:00.123456 12345 solver.cpp:228] ` and
protonet `I1123 15:41:51.801 `. We read both, and lines with no prefix at all.

Rows follow Caffe's tools/extra/parse_log.py: a train row per display (the `Train
net output #k` lines) and a test row per test pass, each with NumIters, Seconds
(since the `Solving` line) and LearningRate. Where parse_log.py gives a row the rate
of the previous display, we give it the rate logged for its own iteration (the one
that iteration's update used). Outputs that Caffe marks as losses (`(* w = x loss)`)
are remembered, so a plot can tell losses from scores.
"""
from __future__ import annotations

import bisect
import csv
import datetime
import math
import os
import re
from dataclasses import dataclass, field

from .errors import ProtonetError
from .io.atomic import atomic_path

FIXED = ["NumIters", "Seconds", "LearningRate"]

_PREFIX = re.compile(r"^[A-Z](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d+))?\s+"
                     r"(?:\w+ [^\s\]]+:\d+\] )?")      # glog: thread id, file:line
_ITERATION = re.compile(r"Iteration (\d+)\b")
_LR = re.compile(r"Iteration \d+, lr = (\S+)")
_TESTING = re.compile(r"Iteration \d+, Testing net \(#(\d+)\)")
_OUTPUT = re.compile(r"\s*(Train|Test) net output #(\d+): (\S+) = (\S+)( \(\* .* loss\))?")


@dataclass
class TrainingLog:
    """Parsed curves: row dicts (FIXED columns first), loss column names, and every
    (iteration, learning rate) the solver logged."""
    train: list[dict[str, float]] = field(default_factory=list)
    test: list[dict[str, float]] = field(default_factory=list)
    losses: set[str] = field(default_factory=set)
    learning_rates: list[tuple[int, float]] = field(default_factory=list)

    @staticmethod
    def columns(rows: list[dict[str, float]]) -> list[str]:
        """Column names in order of first appearance (FIXED first)."""
        names = dict.fromkeys(FIXED)
        for row in rows:
            names.update(dict.fromkeys(row))
        return list(names)

    def is_loss(self, column: str) -> bool:
        return column in self.losses or "loss" in column.lower()


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


class _Clock:
    """Seconds since the solve began, from glog-style month/day/time stamps; the
    year (which only Feb 29 needs) counts up when the month wraps."""

    def __init__(self, year: int):
        self.year, self.month, self.start = year, 0, None

    def seconds(self, stamp: re.Match) -> float:
        month, day, hour, minute, second = (int(g) for g in stamp.groups()[:5])
        micro = int((stamp.group(6) or "0").ljust(6, "0")[:6])
        year = self.year + (month < self.month)
        when = datetime.datetime(year, month, 1, hour, minute, second, micro) + \
            datetime.timedelta(days=day - 1)
        self.year, self.month = year, month
        self.start = self.start or when
        return (when - self.start).total_seconds()

    def restart(self) -> None:
        self.start = None


class _Parser:
    def __init__(self, year: int):
        self.log = TrainingLog()
        self.clock = _Clock(year)
        self.iteration: int | None = None
        self.test_net = 0
        self.rows: dict[str, dict | None] = {"Train": None, "Test": None}

    def line(self, text: str) -> None:
        stamp = _PREFIX.match(text)
        message = text[stamp.end():] if stamp else text
        if stamp and message.startswith("Solving "):
            self.clock.restart()
        try:
            seconds = self.clock.seconds(stamp) if stamp else math.nan
        except ValueError:          # not a date after all
            seconds = math.nan
        found = _ITERATION.match(message)
        if found:
            self.iteration = int(found.group(1))
            self._iteration_message(message)
            return
        output = _OUTPUT.match(message)
        if output and self.iteration is not None:
            self._output(output, seconds)

    def _iteration_message(self, message: str) -> None:
        lr = _LR.match(message)
        if lr:
            self.log.learning_rates.append((self.iteration, _float(lr.group(1))))
        testing = _TESTING.match(message)
        if testing:
            self.test_net = int(testing.group(1))
            if self.test_net == 0:
                self.rows["Test"] = None

    def _output(self, found: re.Match, seconds: float) -> None:
        kind, index, name, value, loss = found.groups()
        row = self.rows[kind]
        if row is None or row["NumIters"] != self.iteration or (kind == "Train" and index == "0"):
            row = {"NumIters": self.iteration, "Seconds": seconds, "LearningRate": math.nan}
            self.rows[kind] = row
            (self.log.train if kind == "Train" else self.log.test).append(row)
        if kind == "Test" and self.test_net:
            name = f"{name}_net{self.test_net}"
        if name in row:
            name = f"{name}#{index}"
        row[name] = _float(value)
        if loss:
            self.log.losses.add(name)

    def finish(self) -> TrainingLog:
        """Give each row the rate logged at its iteration or the latest before it
        (the first one logged for rows before any)."""
        rates = dict(self.log.learning_rates)       # a resumed run's value wins
        iterations = sorted(rates)
        for row in self.log.train + self.log.test:
            if iterations:
                at = bisect.bisect_right(iterations, row["NumIters"]) - 1
                row["LearningRate"] = rates[iterations[max(at, 0)]]
        return self.log


def parse_lines(lines, year: int = 2000) -> TrainingLog:
    """Parse log lines; `year` is the year of the first timestamp."""
    parser = _Parser(year)
    for text in lines:
        parser.line(text.rstrip("\n"))
    return parser.finish()


def _start_year(lines: list[str], end_year: int) -> int:
    """The first line's year, counting back the month wraps from the last line's."""
    months = [int(m.group(1)) for m in map(_PREFIX.match, lines) if m]
    return end_year - sum(b < a for a, b in zip(months, months[1:]))


def parse_log(path: str) -> TrainingLog:
    """Parse a Caffe or protonet training log file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
        end_year = datetime.date.fromtimestamp(os.path.getmtime(path)).year
    except OSError as e:
        raise ProtonetError(f"{path}: cannot read ({e.strerror})") from None
    log = parse_lines(lines, _start_year(lines, end_year))
    if not log.train and not log.test:
        raise ProtonetError(f"{path}: no 'Train net output' or 'Test net output' lines; "
                            "is this a Caffe or protonet training log?")
    return log


def _cell(value) -> str:
    return "" if value is None else repr(value)


def write_csv(path: str, rows: list[dict[str, float]]) -> None:
    """One table as CSV (atomically); missing cells are empty."""
    columns = TrainingLog.columns(rows)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([_cell(row.get(c)) for c in columns] for row in rows)


def save_csv(log: TrainingLog, out_dir: str) -> tuple[str, str]:
    """Write train.csv and test.csv into `out_dir`; returns their paths."""
    paths = os.path.join(out_dir, "train.csv"), os.path.join(out_dir, "test.csv")
    write_csv(paths[0], log.train)
    write_csv(paths[1], log.test)
    return paths


# -- plotting -------------------------------------------------------------------------
def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ProtonetError("plotting needs matplotlib: pip install 'protonet[plot]' "
                            "(or pip install matplotlib)") from None
    return Figure


def _series(log: TrainingLog, want_loss: bool) -> list[tuple[str, list, list]]:
    """(label, iterations, values) for the loss or the score columns of a log."""
    found = []
    for kind, rows in (("train", log.train), ("test", log.test)):
        for column in TrainingLog.columns(rows)[len(FIXED):]:
            if log.is_loss(column) == want_loss:
                points = [(r["NumIters"], r[column]) for r in rows if column in r]
                found.append((f"{kind} {column}", *map(list, zip(*points))))
    return found


def _rates(log: TrainingLog) -> list[tuple[str, list, list]]:
    if not log.learning_rates:
        return []
    iterations, rates = zip(*log.learning_rates)
    return [("lr", list(iterations), list(rates))]


def plot_logs(logs: dict[str, TrainingLog], out: str) -> None:
    """Plot losses, scores (e.g. test accuracy) and the learning rate against
    iterations, one panel each; `logs` maps a legend label to a parsed log."""
    panels = [("loss", lambda log: _series(log, True), {}),
              ("score", lambda log: _series(log, False), {}),
              ("learning rate", _rates, {"drawstyle": "steps-post"})]
    panels = [p for p in panels if any(p[1](log) for log in logs.values())]
    figure = _figure_class()(figsize=(8, 3 * len(panels)), layout="constrained")
    fmt = os.path.splitext(out)[1][1:].lower()
    if fmt not in figure.canvas.get_supported_filetypes():
        raise ProtonetError(f"{out}: matplotlib cannot write .{fmt} files; use one of ."
                            + ", .".join(sorted(figure.canvas.get_supported_filetypes())))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, get, style) in zip(axes, panels):
        for label, log in logs.items():
            for name, x, y in get(log):
                ax.plot(x, y, marker=".", label=f"{label}: {name}" if len(logs) > 1 else name,
                        **style)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel("iterations")
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format=fmt)
