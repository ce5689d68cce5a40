"""How closely the batched engine reproduces the inline engine's metrics, run for run.

    python benchmarks/engine_agreement.py                         # default synthetic run, 5 rounds
    python benchmarks/engine_agreement.py --rounds 20             # the difference over more rounds
    python benchmarks/engine_agreement.py --rounds 20 --perturb   # inline against inline, lr + 1e-8

Each strategy and seed runs ``fedsim task=synthetic`` (10 clients, all sampled, 10 local steps of
batch 32 per round) on the inline engine and on ``engine=batched``, and the largest relative
difference ``|a - b| / |a|`` of every float metric of ``metrics.jsonl`` (timings aside) over the
rounds and seeds is printed, with where it occurred. The two engines compute the same steps in
float32 with different groupings of the arithmetic (vmapped over clients), so they differ by
float rounding; training can amplify such a difference round after round. ``--perturb``
measures that amplification alone: the inline engine against itself with ``sim.lr`` changed by
one part in 1e8.

``tests/test_batched.py`` requires 1e-5 relative after 3 rounds on tiny runs; this measures the
default run. Each run takes a few seconds on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: metrics whose names say they are wall-clock timings
TIMINGS = ("time", "_s")


def float_metrics(row: dict) -> dict[str, float]:
    return {
        k: v for k, v in row.items() if isinstance(v, float) and not any(t in k for t in TIMINGS)
    }


def compare(strategies, seeds, rounds, perturb, folder: Path) -> list[tuple]:
    """Rows ``(strategy, metric, worst relative difference, seed, round, a, b)``."""
    from fedsim.api import run
    from fedsim.results import read_metrics

    worst: dict[tuple[str, str], tuple] = {}
    for strategy in strategies:
        for seed in seeds:
            base = ["task=synthetic", f"strategy={strategy}", f"sim.seed={seed}"]
            base += [f"sim.rounds={rounds}", "sim.lr=0.01"]
            other = ["sim.lr=0.0100000001"] if perturb else ["engine=batched"]
            runs = []
            for name, extra in (("a", []), ("b", other)):
                out = folder / f"{strategy}-{seed}-{name}"
                with contextlib.redirect_stdout(io.StringIO()):  # each run's closing line
                    run(base + extra, output_dir=out)
                runs.append(read_metrics(out / "metrics.jsonl"))
            for row_a, row_b in zip(*runs):
                b_values = float_metrics(row_b)
                for key, a in float_metrics(row_a).items():
                    b = b_values.get(key)
                    if b is None:
                        continue
                    rel = abs(a - b) / max(abs(a), 1e-300)
                    if rel > worst.get((strategy, key), (-1.0,))[0]:
                        worst[(strategy, key)] = (rel, seed, row_a["round"], a, b)
    return [(s, k, *v) for (s, k), v in sorted(worst.items())]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default="fedsb,fedavg,ffa,fedex")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--perturb", action="store_true", help="inline vs inline, lr + 1e-8")
    args = parser.parse_args(argv)
    what = "inline, sim.lr +1e-8" if args.perturb else "batched"
    print(f"inline vs {what}: task=synthetic, {args.rounds} rounds, seeds 0-{args.seeds - 1}")
    print(f"{'strategy':10s} {'metric':28s} {'max rel. diff.':>14s}  where")
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(
            args.strategies.split(","), range(args.seeds), args.rounds, args.perturb, Path(tmp)
        )
    for strategy, key, rel, seed, rnd, a, b in rows:
        where = f"seed {seed}, round {rnd}: {a:.10g} vs {b:.10g}"
        print(f"{strategy:10s} {key:28s} {rel:14.2e}  {where}")


if __name__ == "__main__":
    main()
