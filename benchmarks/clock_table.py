"""Time to accuracy on the simulated clock: strategies x systems x sync/FedBuff (issue 22, item 6).

    python benchmarks/clock_table.py                   # about 10 minutes on 2 cores
    python benchmarks/clock_table.py --seeds 0 --targets 0.6 0.8 --reuse

On the synthetic task (``sim.num_clients=20 sim.clients_per_round=10``), every combination of
  methods: FedIT (``strategy=fedavg``, LoRA), Fed-SB (``strategy=fedsb adapter=lora_sb``),
           FFA-LoRA (``strategy=ffa adapter=ffa``), FedIT with Top-K 1% and EF21
           (``compressor=topk compressor.ratio=0.01 feedback=ef21``);
  systems: ``system=mobile`` and ``system=datacenter``;
  modes:   synchronous (``sim.rounds`` rounds of 10 clients) and FedBuff (``sim.async_buffer=5
           sim.concurrency=10``, EF21 with ``sim.staleness_exponent=0``), with
           ``--buffered-rounds`` server steps: by default rounds x 10 / 5, so that both modes
           aggregate the same number of client updates (FedBuff: 5 a step, each up to some
           versions stale; its clients still in flight at the end trained but never count);
and seeds 0, 1, 2. Then the deadline: synchronous mobile FedIT with ``sim.deadline`` at the
median simulated round time of the no-deadline runs (pooled over seeds) and at half of it.

Run folders go to ``results/clock_table/<method>-<system>-<mode>[-d<deadline>]-s<seed>``.
Every number comes from their summary.json and metrics.jsonl: time to a target is the
simulated time of the first round whose server-test accuracy reaches it (mean over the seeds
that reach it, min-max, how many reached); bytes up per client update are the uplink bytes
measured from the messages over the replies that carried them; simulated time is the run's
whole clock. Measured, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "FedIT": ["strategy=fedavg", "adapter=lora"],
    "Fed-SB": ["strategy=fedsb", "adapter=lora_sb"],
    "FFA-LoRA": ["strategy=ffa", "adapter=ffa"],
    "FedIT+TopK1%+EF21": [
        "strategy=fedavg",
        "adapter=lora",
        "compressor=topk",
        "compressor.ratio=0.01",
        "feedback=ef21",
    ],
}
SYSTEMS = ("mobile", "datacenter")
MODES = ("sync", "fedbuff")


def slug(name: str) -> str:
    return name.lower().replace("+", "-").replace("%", "").replace("fed-sb", "fedsb")


# ----------------------------------------------------------------------------- runs


def base_overrides(args) -> list[str]:
    return [
        "task=synthetic",
        f"sim.num_clients={args.num_clients}",
        f"sim.clients_per_round={args.clients_per_round}",
        f"system.targets=[{','.join(str(t) for t in args.targets)}]",
        "checkpoint.every=0",  # nothing in the table depends on checkpoints or the export
        "export=false",
        "quiet=true",
        *args.overrides,
    ]


def mode_overrides(args, method: str, mode: str) -> list[str]:
    if mode == "sync":
        return [f"sim.rounds={args.rounds}"]
    steps = args.buffered_rounds or args.rounds * args.clients_per_round // args.buffer
    extra = ["sim.staleness_exponent=0"] if "feedback=ef21" in METHODS[method] else []
    return [
        f"sim.rounds={steps}",
        f"sim.async_buffer={args.buffer}",
        f"sim.concurrency={args.concurrency}",
        *extra,
    ]


def run_one(folder: Path, overrides: list[str], reuse: bool) -> Path:
    """One run into ``folder`` (a finished run there is kept with ``--reuse``)."""
    from fedsim.api import run

    done = folder / "summary.json"
    if reuse and done.exists() and json.loads(done.read_text()).get("status") == "ok":
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    run(overrides, output_dir=folder, quiet=True)
    print(f"# {folder.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return folder


def uploads(row: dict, buffered: bool) -> int:
    """The replies whose bytes ``bytes_up`` counts: the aggregated ones, plus those the clock
    dropped after they were sent (late, over-selected; offline too in synchronous rounds,
    where the engine's reply is counted before the clock rules on it)."""
    sent = {"late", "over_selected"} | (set() if buffered else {"offline"})
    return row["clients_ok"] + sum(1 for f in row["failures"] if f["kind"] in sent)


def collect(folder: Path, buffered: bool) -> dict:
    """What the tables need from one run folder."""
    from fedsim.results import read_metrics

    summary = json.loads((folder / "summary.json").read_text())
    rows = [r for r in read_metrics(folder) if r["round"] >= 1]
    late = [sum(1 for f in r["failures"] if f["kind"] == "late") for r in rows]
    return {
        "accuracy": summary["final_eval_accuracy"],
        "tta": summary["time_to_accuracy"],
        "bytes_per_update": sum(r["bytes_up"] for r in rows)
        / max(sum(uploads(r, buffered) for r in rows), 1),
        "sim_time": summary["sim_time_s"],
        "round_times": [r["round_sim_time_s"] for r in rows],
        "late_per_round": statistics.mean(late) if late else 0.0,
        "ok_per_round": statistics.mean(r["clients_ok"] for r in rows),
        "wall": summary["wall_time_s"],
    }


def matrix(args, out: Path) -> dict[tuple[str, str, str], list[dict]]:
    """Every method x system x mode x seed."""
    results: dict[tuple[str, str, str], list[dict]] = {}
    for method, system, mode in [(m, s, d) for m in METHODS for s in SYSTEMS for d in MODES]:
        runs = []
        for seed in args.seeds:
            folder = out / f"{slug(method)}-{system}-{mode}-s{seed}"
            overrides = [
                *base_overrides(args),
                *METHODS[method],
                f"system={system}",
                *mode_overrides(args, method, mode),
                f"sim.seed={seed}",
            ]
            runs.append(collect(run_one(folder, overrides, args.reuse), mode == "fedbuff"))
        results[(method, system, mode)] = runs
    return results


def deadlines(args, out: Path, baseline: list[dict]) -> dict[float | None, list[dict]]:
    """Synchronous mobile FedIT with ``sim.deadline`` at the baseline's median round time
    (pooled over seeds) and at half of it."""
    median = statistics.median(t for r in baseline for t in r["round_times"])
    results: dict[float | None, list[dict]] = {None: baseline}
    for deadline in (round(median, 3), round(median / 2, 3)):
        runs = []
        for seed in args.seeds:
            folder = out / f"fedit-mobile-sync-d{deadline:g}-s{seed}"
            overrides = [
                *base_overrides(args),
                *METHODS["FedIT"],
                "system=mobile",
                *mode_overrides(args, "FedIT", "sync"),
                f"sim.deadline={deadline}",
                f"sim.seed={seed}",
            ]
            runs.append(collect(run_one(folder, overrides, args.reuse), False))
        results[deadline] = runs
    return results


# ----------------------------------------------------------------------------- tables


def reached(runs: list[dict], target: float) -> str:
    """Mean time to ``target`` over the seeds that reach it, min-max, n/N reached."""
    times = [r["tta"].get(f"{target:g}") for r in runs]
    got = [t for t in times if t is not None]
    if not got:
        return f"- (0/{len(runs)})"
    spread = f"{min(got):.3g}-{max(got):.3g}"
    return f"{statistics.mean(got):.3g} s ({spread}; {len(got)}/{len(runs)})"


def common(runs: list[dict], targets: list[float]) -> list[str]:
    return [
        f"{statistics.mean(r['accuracy'] for r in runs):.3f}",
        *(reached(runs, t) for t in targets),
        f"{statistics.mean(r['bytes_per_update'] for r in runs):,.0f}",
        f"{statistics.mean(r['sim_time'] for r in runs):.3g} s",
    ]


def main_table(results, targets: list[float]) -> list[str]:
    head = [
        "method",
        "system",
        "mode",
        "final accuracy (mean)",
        *(f"time to {t:g} (mean; min-max; reached)" for t in targets),
        "bytes up per client update",
        "simulated total time (mean)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, system, mode), runs in results.items():
        lines.append("| " + " | ".join([method, system, mode, *common(runs, targets)]) + " |")
    return lines


def deadline_table(results, targets: list[float]) -> list[str]:
    head = [
        "sim.deadline",
        "late (dropped) per round",
        "aggregated per round",
        "final accuracy (mean)",
        *(f"time to {t:g} (mean; min-max; reached)" for t in targets),
        "bytes up per client update",
        "simulated total time (mean)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for deadline, runs in results.items():
        name = "none" if deadline is None else f"{deadline:g} s"
        late = statistics.mean(r["late_per_round"] for r in runs)
        ok = statistics.mean(r["ok_per_round"] for r in runs)
        cells = [name, f"{late:.2f}", f"{ok:.2f}", *common(runs, targets)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="synchronous rounds")
    parser.add_argument("--buffered-rounds", type=int, help="FedBuff steps (default: same updates)")
    parser.add_argument("--buffer", type=int, default=5, help="FedBuff's K")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--num-clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "clock_table")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --out")
    parser.add_argument("overrides", nargs="*", help="more fedsim overrides for every run")
    args = parser.parse_args()
    t0 = time.perf_counter()
    results = matrix(args, args.out)
    cut = deadlines(args, args.out, results[("FedIT", "mobile", "sync")])
    steps = args.buffered_rounds or args.rounds * args.clients_per_round // args.buffer
    print(
        f"synthetic task, {args.num_clients} clients; sync: {args.rounds} rounds of "
        f"{args.clients_per_round}; FedBuff: {steps} steps of K={args.buffer}, concurrency "
        f"{args.concurrency}; seeds {' '.join(map(str, args.seeds))}; run folders in {args.out}"
    )
    print()
    print("\n".join(main_table(results, args.targets)))
    print()
    print("Deadline: synchronous, system=mobile, FedIT (late clients' replies are dropped)")
    print()
    print("\n".join(deadline_table(cut, args.targets)))
    print()
    runs = [r for rs in results.values() for r in rs]
    runs += [r for deadline, rs in cut.items() if deadline is not None for r in rs]
    print(
        f"{len(runs)} runs, {sum(r['wall'] for r in runs):.0f} s inside fedsim; "
        f"script wall time {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
