"""What the terminal shows of a run: a header, one line per round, a live progress line within
each round, and the closing line (printed with ``quiet=true`` too).

The progress line (clients trained, local steps, elapsed, the round's and the run's estimated
time left) is rewritten in place when stdout is a terminal; when it is not (a log file, a
sweep's worker), a plain line is printed at most every :attr:`Progress.plain_every` seconds of
a round, so that a long round is not silent and a short one adds nothing. The counts come from
:mod:`fedsim.meter`: from the training loops and the grids of the engines that run clients in
this process (inline, batched); with ``engine=ray`` only the replies are counted.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape

from fedsim import meter


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_seconds(s: float) -> str:
    """Simulated seconds, readable: 12 ms, 4.2 s, 12.5 min, 3.2 h, 2.1 d."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s" if s >= 0.9995 or s == 0 else f"{s * 1e3:.3g} ms"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def job_tag() -> str:
    """``[job i/N] `` inside a sweep's job (fedsim's command line sets it), else ``""``."""
    tag = os.environ.get("FEDSIM_JOB_TAG", "")
    return f"[{tag}] " if tag else ""


class Progress:
    """Counts a round's clients and local steps and estimates the time left.

    The run's estimate: the rounds still to come at the mean wall time of the rounds done
    (this run's, so far; the first is left out once there are others: it carries one-off
    costs such as Opacus' set-up), plus what is left of this round (from its share of local
    steps done, or of clients when steps are not reported).
    """

    #: seconds between plain progress lines when stdout is not a terminal
    plain_every = 30.0

    def __init__(self, rounds: int, local_steps: int, out: TextIO, live: bool) -> None:
        self.rounds, self.local_steps, self.out, self.live = rounds, local_steps, out, live
        self.durations: list[float] = []
        self.round = self.clients = self.done = self.steps = self.examples = 0
        self.phase = "idle"
        self.t0 = self.shown = 0.0
        self.width = 0

    # ------------------------------------------------------------------ events
    def begin(self, server_round: int, clients: int) -> None:
        """A round starts (round 0: the adapter's set-up and the first evaluation)."""
        self.round, self.clients, self.done, self.steps = server_round, clients, 0, 0
        self.examples = 0
        self.phase = "training" if server_round > 0 else "setup"
        self.t0 = self.shown = time.perf_counter()

    def evaluating(self) -> None:
        if self.phase in ("training", "setup"):
            self.phase, self.examples = "evaluating", 0
            self._show(force=True)

    def end(self, seconds: float) -> None:
        if self.round > 0 and self.phase != "idle":
            self.durations.append(seconds)
        self.phase = "idle"
        self.clear()

    def event(self, kind: str, count: int) -> None:
        if self.phase == "idle":
            return
        if kind == "examples":
            self.examples += count
        elif self.phase == "training":
            if kind == "steps":
                self.steps += count
            else:
                self.done += count
        self._show()

    # ------------------------------------------------------------------ estimates
    def fraction(self) -> float | None:
        """The share of this round's training done (None before anything is)."""
        total = self.clients * self.local_steps
        if self.steps and total:
            return min(self.steps / total, 1.0)
        if self.done and self.clients:
            return min(self.done / self.clients, 1.0)
        return None

    def left(self, elapsed: float) -> tuple[float | None, float | None]:
        """Seconds left of this round's training and of the run (None: no estimate yet)."""
        f = self.fraction()
        round_left = elapsed / f - elapsed if f else None
        later = self.rounds - self.round
        if self.durations:
            mean = self.mean_round()
            if round_left is None:
                round_left = max(mean - elapsed, 0.0)
            return round_left, round_left + later * mean
        if round_left is None:
            return None, None
        return round_left, round_left + later * (round_left + elapsed)

    def run_left(self) -> float | None:
        """After a round: the rounds still to come at the mean round time (None: none done)."""
        if not self.durations:
            return None
        return (self.rounds - self.round) * self.mean_round()

    def mean_round(self) -> float:
        done = self.durations[1:] if len(self.durations) > 1 else self.durations
        return sum(done) / len(done)

    # ------------------------------------------------------------------ display
    def text(self) -> str:
        elapsed = time.perf_counter() - self.t0
        parts = [f"round {self.round}/{self.rounds}"]
        if self.phase == "evaluating":
            parts.append(f"evaluating ({self.examples} examples)")
        elif self.phase == "setup":
            parts.append(f"setting up ({self.examples} examples)")
        else:
            parts.append(f"clients {self.done}/{self.clients}")
            if self.steps:
                parts.append(f"steps {self.steps}/{self.clients * self.local_steps}")
        parts.append(f"{elapsed:.1f} s")
        round_left, run_left = self.left(elapsed)
        if self.phase == "training" and round_left is not None:
            parts.append(f"round ETA {human_seconds(round_left)}")
        if run_left is not None:
            parts.append(f"run ETA {human_seconds(run_left)}")
        return job_tag() + "  ".join(parts)

    def _show(self, force: bool = False) -> None:
        now = time.perf_counter()
        every = 0.2 if self.live else self.plain_every
        if not force and now - self.shown < every:
            return
        self.shown = now
        if not self.live:
            if force:  # the plain lines are for long rounds only
                return
            self.out.write(self.text() + "\n")
        else:  # one terminal line at most, or the carriage return cannot go back over it
            text = self.text()[: shutil.get_terminal_size().columns - 1]
            self.out.write("\r" + text + " " * max(self.width - len(text), 0))
            self.width = len(text)
        self.out.flush()

    def clear(self) -> None:
        if self.live and self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()
            self.width = 0


class RoundPrinter:
    """The run's lines on the terminal, and its live progress (see the module docstring)."""

    def __init__(
        self, rounds: int, quiet: bool = False, local_steps: int = 0, out: TextIO | None = None
    ) -> None:
        self.rounds, self.quiet = rounds, quiet
        out = sys.stdout if out is None else out
        self.console = Console(highlight=False, soft_wrap=True, file=out)
        live = not quiet and out.isatty() and os.environ.get("TERM") != "dumb"
        self.progress = Progress(rounds, local_steps, out, live)
        self.tag = escape(job_tag())  # rich would read [job 1/2] as markup

    def start(self) -> None:
        """Listen to the training loops (until :meth:`stop`); nothing with ``quiet=true``."""
        if not self.quiet:
            meter.listen(self.progress.event)

    def stop(self) -> None:
        meter.listen(None)
        self.progress.clear()

    def begin_round(self, server_round: int, clients: int) -> None:
        self.progress.begin(server_round, clients)

    def evaluating(self) -> None:
        self.progress.evaluating()

    def header(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"{self.tag}[bold]fedsim[/bold] {text}")

    def round(self, r: dict[str, Any]) -> None:
        self.progress.end(float(r.get("round_time_s", 0.0)))
        if self.quiet:
            return
        width = len(str(self.rounds))
        left = self.progress.run_left()
        self.console.print(
            f"{self.tag}round {r['round']:>{width}}/{self.rounds}"
            f"  loss {_fmt(r.get('train_loss'), '.4f')}"
            f"  {_accuracy(r)}"
            f"  up {human_bytes(r['bytes_up'])}  down {human_bytes(r['bytes_down'])}"
            f"  ok {r['clients_ok']}/{r['clients_ok'] + r['clients_failed']}"
            + (f"  eps {r['epsilon']:.2f}" if r.get("epsilon") is not None else "")
            + f"  {r['round_time_s']:.2f} s"
            + (f"  clock {human_seconds(r['sim_time_s'])}" if "sim_time_s" in r else "")
            + (f"  ETA {human_seconds(left)}" if left and r["round"] < self.rounds else "")
        )

    def warning(self, text: str) -> None:
        if not self.quiet:
            self.progress.clear()
            self.console.print(f"{self.tag}[yellow]warning:[/yellow] {text}")

    def line(self, text: str) -> None:
        if not self.quiet:
            self.progress.clear()
            self.console.print(f"{self.tag}{text}")

    def final(self, text: str) -> None:
        """The run's closing line: printed with ``quiet=true`` too (where the results are)."""
        self.progress.clear()
        self.console.print(f"{self.tag}{text}")


def _accuracy(r: dict[str, Any]) -> str:
    """The round's accuracy: the server's, and the clients' mean and worst."""
    server = r.get("eval_accuracy")
    if server is None and r.get("eval_accuracy_client_mean") is None:
        if not r.get("clients_evaluated") and "eval_accuracy" in r:
            return "acc - (not evaluated)"
    return (
        f"acc {_fmt(server, '.4f')}"
        f" (clients {_fmt(r.get('eval_accuracy_client_mean'), '.3f')}"
        f", min {_fmt(r.get('eval_accuracy_client_min'), '.3f')})"
    )
