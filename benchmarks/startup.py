"""How long ``fedsim`` takes to start: to print its help, to refuse a bad configuration, and to
reach the first round of a small run.

    python benchmarks/startup.py                       # 5 repetitions of every command
    python benchmarks/startup.py --repeats 9 --json startup.json
    python benchmarks/startup.py --baseline /tmp/old   # also a copy of an older fedsim/ tree

Every command is a fresh ``fedsim`` process (the console script beside this interpreter, else
``python -m fedsim``), started from an empty temporary folder with Flower's telemetry and
update check off, as a user runs it. One unrecorded run of each command warms the page cache;
then the commands alternate ``--repeats`` times, so that drift on a shared machine hits them
all, and each row is the median (min-max) of its repetitions. A refusal is timed to the
process's exit (its one line on stderr is then printed); a run is timed to its first
``round`` line on stdout (round 0: the initial evaluation), and to its exit. ``--baseline``
times ``python -m fedsim`` from another source tree too (its ``fedsim/`` first on the path;
the configs are the installed ones unless the tree has ``fedsim/conf``), each command
alternated with the installed one (or ``--tree``'s): before and after on the same load.

Goals (issue 24, item 6): ``--help`` under 2 s; a configuration mistake refused in under
2.5 s: one the configuration alone shows (an unknown key, an unknown option of a group, a value
out of range: no heavy module imported), and one only the built components show (a
component's value, a combination of components: PyTorch is imported, but the partitioner's
libraries and PyTorch's compiler only after every combination is checked). Measured, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: (name, overrides, expected exit status, goal in seconds or None)
CASES: list[tuple[str, list[str], int, float | None]] = [
    ("--help", ["--help"], 0, 2.0),
    ("unknown key", ["task=synthetic", "sim.rouds=3"], 2, 2.5),
    ("unknown option", ["strategy=nope"], 2, 2.5),
    ("value out of range", ["sim.rounds=-1"], 2, 2.5),
    ("component value", ["task=synthetic", "compressor=topk", "compressor.ratio=2"], 2, 2.5),
    ("combination", ["task=synthetic", "strategy=local", "sim.prox_mu=0.1"], 2, 2.5),
]
#: the run timed to its first round line
RUN = ["task=synthetic", "sim.rounds=1"]


def command(tree: Path | None) -> list[str]:
    """``fedsim`` as installed beside this interpreter (else ``python -m fedsim``); with a
    source tree, ``python -m fedsim`` with that tree first on the path."""
    script = Path(sys.executable).with_name("fedsim")
    if tree is None and script.exists():
        return [str(script)]
    found = shutil.which("fedsim")
    return [found] if tree is None and found else [sys.executable, "-m", "fedsim"]


def environment(tree: Path | None) -> dict[str, str]:
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONWARNINGS": "ignore",
    }
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    return env


def refusal(tree: Path | None, args: list[str], cwd: Path) -> tuple[float, int, str]:
    """(seconds to exit, exit status, last line of stderr) of one command."""
    start = time.perf_counter()
    proc = subprocess.run(
        [*command(tree), *args], capture_output=True, text=True, env=environment(tree), cwd=cwd
    )
    took = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    return took, proc.returncode, lines[-1] if lines else ""


def first_round(tree: Path | None, cwd: Path) -> tuple[float, float, int]:
    """(seconds to the first ``round`` line, seconds to exit, exit status) of :data:`RUN`."""
    out = Path(tempfile.mkdtemp(dir=cwd)) / "run"
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*command(tree), *RUN, f"hydra.run.dir={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=environment(tree),
        cwd=cwd,
    )
    first = float("nan")
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("round ") and first != first:
            first = time.perf_counter() - start
    rc = proc.wait()
    return first, time.perf_counter() - start, rc


def measure(trees: dict[str, Path | None], repeats: int) -> dict:
    """Every command of every tree, alternated; times[tree][case] and statuses[tree][case]."""
    names = [name for name, *_ in CASES] + ["first round line", "whole run"]
    times = {t: {n: [] for n in names} for t in trees}
    statuses: dict[str, dict[str, tuple[int, str]]] = {t: {} for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        for repeat in range(repeats + 1):  # the first: page cache, not recorded
            for name, overrides, _, _ in CASES:
                for t, tree in trees.items():
                    took, rc, line = refusal(tree, overrides, cwd)
                    statuses[t][name] = (rc, line)
                    if repeat:
                        times[t][name].append(took)
            for t, tree in trees.items():
                first, whole, rc = first_round(tree, cwd)
                statuses[t]["first round line"] = statuses[t]["whole run"] = (rc, "")
                if repeat:
                    times[t]["first round line"].append(first)
                    times[t]["whole run"].append(whole)
    return {"times": times, "statuses": statuses}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(result: dict, repeats: int) -> None:
    times, statuses = result["times"], result["statuses"]
    trees = list(times)
    print(f"median (min-max) of {repeats} runs, seconds; goals of issue 24 item 6")
    heads = " ".join(f"{t:>18}" for t in trees)
    print(f"{'case':18} {'command':48} {heads} {'goal':>5} {'met':>4} {'exit':>5}")
    rows = [*CASES, ("first round line", RUN, 0, None), ("whole run", RUN, 0, None)]
    for name, overrides, expected, goal in rows:
        cells = " ".join(f"{spread(times[t][name]):>18}" for t in trees)
        median = statistics.median(times[trees[0]][name])
        met = "-" if goal is None else ("yes" if median < goal else "NO")
        shown = "-" if goal is None else f"{goal:.1f}"
        rc = statuses[trees[0]][name][0]
        status = f"{rc}" if rc == expected else f"{rc}!"
        cmd = " ".join(overrides)
        print(f"{name:18} {cmd:48} {cells} {shown:>5} {met:>4} {status:>5}")
    print("refusals, as printed:")
    for name, *_ in CASES[1:]:
        print(f"  {name}: {statuses[trees[0]][name][1][:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of every command")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also time fedsim from this source tree (a copy of fedsim/ to compare with), "
        "alternated with the installed one",
    )
    parser.add_argument(
        "--tree", type=Path, help="time fedsim from this source tree instead of the installed one"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    trees: dict[str, Path | None] = {"fedsim": args.tree.resolve() if args.tree else None}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    for name, tree in trees.items():
        where = f"PYTHONPATH={tree} " if tree is not None else ""
        print(f"{name}: {where}{' '.join(command(tree))}")
    result = measure(trees, args.repeats)
    table(result, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
