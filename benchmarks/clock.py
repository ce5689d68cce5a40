"""What the simulated clock (``system``) costs in wall time.

    python benchmarks/clock.py                         # synthetic, 20 clients, 10 per round
    python benchmarks/clock.py --repeats 5 --rounds 15 sim.local_steps=20

Variants, all on the same workload, run in one process and alternated ``--repeats`` times
(after one short warm-up run of each), so that drift on a shared machine hits all of them:
  (a) none:    ``system=none`` (no clock);
  (b) mobile:  ``system=mobile`` (synchronous rounds on the clock);
  (c) fedbuff: ``system=mobile sim.async_buffer=5 sim.concurrency=10`` (a "round" is one
               FedBuff server step: 5 arrivals; its clients train when they are dispatched).

Round wall time: ``round_time_s`` of metrics.jsonl (training, aggregation and evaluation),
the median over rounds 2..R of one run, then the median over the repeats; b/a and c/a are
medians over the alternations of the per-alternation ratios. Clock time: every public method
of :class:`fedsim.system.clock.Clock` and every function of :mod:`fedsim.apps.server.timing`
is wrapped (in this process only) with a ``perf_counter`` accumulator; calls nested inside
another wrapped call count once (the outermost). A round's clock time is what was spent in
the clock from the end of the previous round's ``record_round`` (evaluation, its line of
metrics.jsonl, the clock's ``note``) to the end of its own; its share is that time over the
round's wall time, median over rounds 2..R. ``build_clock`` (profiles bound, FLOPs per
example counted) runs once per run, before round 0: reported apart as a one-off. The
wrappers' own cost (two ``perf_counter`` calls a call) lands in (b) and (c): their ratios
are upper bounds. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "none": ["system=none"],
    "mobile": ["system=mobile"],
    "fedbuff": ["system=mobile", "sim.async_buffer=5", "sim.concurrency=10"],
}


# ----------------------------------------------------------------------------- accounting


class ClockTimer:
    """Accumulates wall time spent inside the clock's code (outermost calls only)."""

    def __init__(self) -> None:
        self.depth = 0
        self.total = 0.0
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.marks: list[tuple[int, float]] = []  # (round noted, total after the note)

    def reset(self) -> None:
        self.total, self.marks = 0.0, []
        self.calls.clear()
        self.seconds.clear()

    def wrap(self, name: str, fn):
        timer = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if timer.depth:
                return fn(*args, **kwargs)
            timer.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                timer.depth -= 1
                timer.total += dt
                timer.calls[name] += 1
                timer.seconds[name] += dt

        return timed

    def marker(self, fn):
        """``FederatedRun.record_round`` (not timed): notes the total after each round."""
        timer = self

        @functools.wraps(fn)
        def marked(run, server_round, *args, **kwargs):
            out = fn(run, server_round, *args, **kwargs)
            timer.marks.append((int(server_round), timer.total))
            return out

        return marked


TIMER = ClockTimer()


def instrument() -> list[str]:
    """Wrap Clock's public methods and timing's functions; returns the names wrapped."""
    from fedsim.apps.server import report, timing
    from fedsim.apps.server.run import FederatedRun
    from fedsim.system import clock

    names = []
    for name, fn in inspect.getmembers(clock.Clock, inspect.isfunction):
        if not name.startswith("_"):
            setattr(clock.Clock, name, TIMER.wrap(f"Clock.{name}", fn))
            names.append(f"Clock.{name}")
    for name, fn in inspect.getmembers(timing, inspect.isfunction):
        if fn.__module__ == timing.__name__:
            setattr(timing, name, TIMER.wrap(f"timing.{name}", fn))
            names.append(f"timing.{name}")
    report.clock_summary = timing.summary  # report.py imported it by name
    FederatedRun.record_round = TIMER.marker(FederatedRun.record_round)
    return names


# ----------------------------------------------------------------------------- runs


def one_run(overrides: list[str]) -> dict:
    """One run in this process: steady round wall time, the clock's share, its one-off."""
    from fedsim.api import run
    from fedsim.results import read_metrics

    TIMER.reset()
    with tempfile.TemporaryDirectory() as tmp:
        run(overrides, output_dir=Path(tmp) / "run", quiet=True)
        rows = read_metrics(Path(tmp) / "run")
    wall = {r["round"]: r["round_time_s"] for r in rows}
    clients = {r["round"]: r["clients_sampled"] for r in rows}
    steady = [r for r in sorted(wall) if r >= 2] or [r for r in sorted(wall) if r >= 1]
    per_round = dict(zip([r for r, _ in TIMER.marks[1:]], _diffs(TIMER.marks)))
    shares = [per_round[r] / wall[r] for r in steady if r in per_round]
    return {
        "round_s": statistics.median(wall[r] for r in steady),
        "per_update_s": statistics.median(wall[r] / max(clients[r], 1) for r in steady),
        "clock_round_s": statistics.median(per_round[r] for r in steady) if shares else 0.0,
        "clock_share": statistics.median(shares) if shares else 0.0,
        "build_clock_s": TIMER.seconds.get("timing.build_clock", 0.0),
        "calls_per_round": sum(TIMER.calls.values()) / max(len(wall), 1),
        "accuracy": rows[-1]["eval_accuracy"],
        "by_function_ms": {k: v * 1000 / len(wall) for k, v in TIMER.seconds.items()},
    }


def _diffs(marks: list[tuple[int, float]]) -> list[float]:
    return [b - a for (_, a), (_, b) in zip(marks, marks[1:])]


def alternate(base: list[str], repeats: int) -> dict[str, list[dict]]:
    """Every variant ``repeats`` times, alternating, after a 2-round warm-up of each."""
    for extra in VARIANTS.values():
        one_run([*base, *extra, "sim.rounds=2"])
    out: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(repeats):
        for variant, extra in VARIANTS.items():
            out[variant].append(one_run([*base, *extra]))
            r = out[variant][-1]
            print(
                f"# repeat {i + 1}/{repeats} {variant:8} round {r['round_s'] * 1000:7.1f} ms"
                f"  clock {r['clock_share'] * 100:6.3f}%",
                file=sys.stderr,
                flush=True,
            )
    return out


# ----------------------------------------------------------------------------- report


def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(results: dict[str, list[dict]]) -> list[str]:
    base = results["none"]
    lines = [
        "| variant | round wall (ms) | ratio to none | wall per client update (ms) "
        "| clock per round (ms) | clock share of round | clock calls per round "
        "| build_clock once (ms) | final accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, runs in results.items():
        ratios = [r["round_s"] / b["round_s"] for r, b in zip(runs, base)]
        lines.append(
            f"| {variant} | {med(runs, 'round_s') * 1000:.1f} | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
            f"{med(runs, 'per_update_s') * 1000:.2f} | {med(runs, 'clock_round_s') * 1000:.3f} | "
            f"{med(runs, 'clock_share') * 100:.3f}% | {med(runs, 'calls_per_round'):.1f} | "
            f"{med(runs, 'build_clock_s') * 1000:.1f} | {med(runs, 'accuracy'):.4f} |"
        )
    return lines


def breakdown(runs: list[dict], top: int = 5) -> str:
    """Where the clock's time went, per round (mean over runs; build_clock apart)."""
    names = {k for r in runs for k in r["by_function_ms"] if k != "timing.build_clock"}
    mean = {k: statistics.mean(r["by_function_ms"].get(k, 0.0) for r in runs) for k in names}
    ranked = sorted(mean.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {v:.3f}" for k, v in ranked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5, help="alternations of the variants")
    parser.add_argument("--json", type=Path, help="also write the per-run results here")
    parser.add_argument("overrides", nargs="*", help="fedsim overrides, e.g. sim.local_steps=20")
    args = parser.parse_args()
    base = [
        "task=synthetic",  # the workload the printed numbers describe
        "strategy=fedavg",
        "sim.num_clients=20",
        "sim.clients_per_round=10",
        f"sim.rounds={args.rounds}",
        "checkpoint.every=0",  # (outside round_time_s either way; FedBuff writes none)
        "export=false",
        "quiet=true",
        *args.overrides,
    ]
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    wrapped = instrument()
    results = alternate(base, args.repeats)
    print(f"workload: {' '.join(base)}; {args.repeats} alternations of the variants")
    print(f"wrapped: {', '.join(wrapped)}")
    print()
    print("\n".join(table(results)))
    print()
    for variant in ("mobile", "fedbuff"):
        print(f"{variant}: clock ms per round by function: {breakdown(results[variant])}")
    print()
    print("round wall: median over rounds 2..R, then over repeats; ratio: median (min-max) of")
    print("the per-alternation ratios; clock share: median over rounds of clock time / round")
    print(f"wall, then over repeats. Benchmark wall time {time.perf_counter() - t0:.0f} s.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"overrides": base, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
