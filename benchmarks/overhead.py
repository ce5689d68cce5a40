"""What fedsim's engines cost over a plain PyTorch loop doing the same federated training.

    python benchmarks/overhead.py                      # synthetic default, 10 clients per round
    python benchmarks/overhead.py --skip-ray sim.local_steps=20

Variants, all on the same workload:
  (a) plain:  benchmarks/plain_loop.py: the same clients, batches, seeds, aggregation and
              evaluation (server test set and every client's test split) in one process,
              without Flower;
  (b) inline: fedsim's inline engine (an in-process Flower Grid);
  (c) ray:    fedsim's ray engine (Flower's simulation engine, Ray backend).

Steady-state round time: the median over rounds 2..R of one run (a round is training,
aggregation and evaluation). Plain and inline alternate ``--repeats`` times inside one process,
so that drift on a shared machine hits both; the ratio b/a is best against best. Ray runs once
in its own process. Start-up (time to the first training round, imports included) and peak
resident memory of the process tree (Ray's processes included) come from one fresh process per
variant. Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- memory


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(x) for x in text.split()]
    return kids + [g for k in kids for g in _children(k)]


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the resident memory of this process and all its descendants (Linux /proc)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak_kib, self.interval = 0, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = sum(_rss_kib(p) for p in [me, *_children(me)])
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- runs


def one_run(variant: str, overrides: list[str]) -> list[dict]:
    """The per-round records of one run of ``variant`` in this process."""
    from fedsim.api import run
    from fedsim.config import compose
    from fedsim.results import read_metrics

    if variant == "plain":
        from benchmarks.plain_loop import plain_fedavg

        cfg, _ = compose(overrides)
        return plain_fedavg(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        run([*overrides, f"engine={variant}", "quiet=true"], output_dir=out)
        return read_metrics(out)


def steady(rows: list[dict]) -> float:
    times = [r["round_time_s"] for r in rows if r["round"] >= 1]
    return statistics.median(times[1:] if len(times) > 1 else times)


def fresh(variant: str, overrides: list[str]) -> dict:
    """Child process: one run from a cold start."""
    with TreeMemory() as mem:
        rows = one_run(variant, overrides)
    times = [r["round_time_s"] for r in rows if r["round"] >= 1]
    return {
        "variant": variant,
        "steady_round_s": steady(rows),
        "startup_s": time.perf_counter() - T_START - sum(times),
        "peak_rss_mib": mem.peak_kib / 1024,
        "final_eval_accuracy": rows[-1]["eval_accuracy"],
    }


def alternate(overrides: list[str], repeats: int) -> dict:
    """Child process: plain and inline, alternating, after one warm-up run of each."""
    one_run("plain", [*overrides, "sim.rounds=2"])
    one_run("inline", [*overrides, "sim.rounds=2"])
    out: dict[str, list[float]] = {"plain": [], "inline": []}
    for _ in range(repeats):
        for variant in ("plain", "inline"):
            out[variant].append(steady(one_run(variant, overrides)))
    return out


def child(args: list[str], script: str | None = None) -> dict:
    """Run ``script`` (default: this file) in a fresh process; its last stdout line, as JSON."""
    cmd = [sys.executable, script or __file__, *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--child", choices=["plain", "inline", "ray", "alternate"], help=argparse.SUPPRESS
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="alternations of plain/inline")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="fedsim overrides, e.g. sim.local_steps=20")
    args = parser.parse_args()
    overrides = [
        "task=synthetic",  # the workload the printed numbers describe
        "strategy=fedavg",
        "sim.num_clients=10",
        "sim.clients_per_round=10",
        f"sim.rounds={args.rounds}",
        *args.overrides,
    ]
    sys.path.insert(0, str(ROOT))
    if args.child == "alternate":
        print(json.dumps(alternate(overrides, args.repeats)))
        return
    if args.child:
        print(json.dumps(fresh(args.child, overrides)))
        return

    passthrough = ["--rounds", str(args.rounds), "--repeats", str(args.repeats), *args.overrides]
    alt = child(["--child", "alternate", *passthrough])
    cold = {v: child(["--child", v, *passthrough]) for v in ("plain", "inline")}
    if not args.skip_ray:
        cold["ray"] = child(["--child", "ray", *passthrough])

    plain_best, inline_best = min(alt["plain"]), min(alt["inline"])
    pairs = [i / p for p, i in zip(alt["plain"], alt["inline"])]
    steady_s = {"plain": plain_best, "inline": inline_best}
    if "ray" in cold:
        steady_s["ray"] = cold["ray"]["steady_round_s"]
    from fedsim.config import compose

    clients = compose(overrides)[0]["sim"]["clients_per_round"]
    print(f"workload: synthetic task; {' '.join(overrides)}; torch threads 1 per client")
    print(
        f"{'variant':8} {'round (s)':>10} {'ratio':>7} {'start-up (s)':>13} "
        f"{'peak RSS (MiB)':>15} {'accuracy':>9}"
    )
    for v, s in steady_s.items():
        c = cold[v]
        print(
            f"{v:8} {s:10.4f} {s / plain_best:7.3f} {c['startup_s']:13.2f} "
            f"{c['peak_rss_mib']:15.0f} {c['final_eval_accuracy']:9.4f}"
        )
    print(
        f"b/a best against best over {args.repeats} alternations: {inline_best / plain_best:.3f}; "
        f"per alternation: {', '.join(f'{r:.3f}' for r in pairs)} "
        f"(median {statistics.median(pairs):.3f})"
    )
    print(
        f"inline overhead: {(inline_best - plain_best) / clients * 1000:.2f} ms per client-round "
        f"(training message, evaluation message, copies, aggregation)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"overrides": overrides, "alternating": alt, "fresh": cold}, indent=2)
        )


if __name__ == "__main__":
    main()
