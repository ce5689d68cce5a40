"""Engines against a plain sequential PyTorch loop: client-steps per second and peak memory.

    python benchmarks/engines.py                       # synthetic, 32 clients per round, lora_sb
    python benchmarks/engines.py --ray --sentiment     # also Flower's Ray engine and MiniLM
    python benchmarks/engines.py --threads 2 adapter=lora
    python benchmarks/engines.py --scale               # also 100,000 registered clients

Workload (printed with the results): the synthetic task, 32 clients, all of them in every
round, 10 local AdamW steps of batch 32, FedAvg of LoRA-SB's ``R`` and the head
(``adapter.init.method=random``: the plain loop has no data-driven initialisation), the
server's test set evaluated every round; no per-client evaluation and no aggregation-error
diagnostic (the plain loop does neither: the benchmark is about training).

Variants, all on the same clients, batches and seeds:
  plain    benchmarks/plain_loop.py: each client trained in turn in one PyTorch loop, no Flower;
  inline   fedsim's in-process engine (a Flower Grid calling the ClientApp);
  batched  fedsim's batched engine (each round's clients in vmapped groups; group 32);
  ray      fedsim's ray engine (Flower's simulation engine), with --ray.

Client-steps per second: clients per round x local steps / the steady-state round time (the
median over rounds 2..R; a round is training, aggregation and evaluation). plain, inline and
batched alternate ``--repeats`` times in one process (drift on a shared machine hits them all)
and are compared best against best; peak resident memory (Ray's processes included) comes from
one fresh process per variant. ``--sentiment`` adds MiniLM on Rotten Tomatoes (8 clients
per round, 4 local steps of batch 16, FedAvg of LoRA r=8 on all 36 linear layers, the model's
own dropout on), with ``inline-2t``: the inline engine on two torch threads, what
``engine.num_threads=auto`` (the default) gives MiniLM on a 2-core machine. A variant named
``<engine>-<n>t`` runs ``engine.num_threads=n``; the others run ``--threads`` (1). Speed is
measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.overhead import TreeMemory, one_run, steady  # noqa: E402
from benchmarks.overhead import child as run_child  # noqa: E402

SYNTHETIC = [
    "task=synthetic",
    "strategy=fedavg",
    "adapter=lora_sb",
    "adapter.init.method=random",
    "sim.num_clients=32",
    "sim.clients_per_round=32",
    "sim.eval_clients=0",
    "sim.aggregation_error=false",
    "export=false",
    "checkpoint.every=0",
]
#: --sentiment: MiniLM on Rotten Tomatoes, 8 clients per round, the model's own dropout on
#: (0.1, the checkpoint's), as a user runs it
SENTIMENT = [
    "task=sentiment",
    "strategy=fedavg",
    "sim.clients_per_round=8",
    "sim.local_steps=4",
    "sim.eval_clients=0",
    "sim.aggregation_error=false",
    "export=false",
    "checkpoint.every=0",
]
#: --scale: many registered clients, 1000 per round, EF21 memories in every trained client's
#: state; the synthetic pool made on demand (a stored pool is 32 KiB of inputs per client)
SCALE = [
    "task=synthetic",
    "task.pool=on_demand",
    "strategy=fedavg",
    "sim.clients_per_round=1000",
    "sim.rounds=2",
    "sim.eval_clients=100",
    "compressor=topk",
    "compressor.ratio=0.1",
    "feedback=ef21",
    "engine=batched",
    "export=false",
    "checkpoint.every=0",
]


def client_steps(overrides: list[str]) -> int:
    from fedsim.config import compose

    sim = compose(overrides)[0]["sim"]
    return sim["clients_per_round"] * sim["local_steps"]


def variant_overrides(variant: str, base: list[str], threads: int) -> tuple[str, list[str]]:
    """(engine run by one_run, overrides) of a variant name such as ``batched-2t``."""
    engine, _, t = variant.partition("-")
    n = int(t[:-1]) if t else threads
    extra = [f"engine.num_threads={n}"]  # the plain loop reads it too
    if engine == "ray":
        extra = ["engine.num_cpus=2"]
    return engine, [*base, *extra]


def alternate(base: list[str], variants: list[str], repeats: int, threads: int) -> dict:
    """Child process: the variants in turn, ``repeats`` times, after a warm-up of each (the
    plain loop runs 1 torch thread, the engines ``engine.num_threads``)."""
    out: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:
        one_run(*variant_overrides(v, [*base, "sim.rounds=2"], threads))
    for _ in range(repeats):
        for v in variants:
            out[v].append(steady(one_run(*variant_overrides(v, base, threads))))
    return out


def child(args: list[str]) -> dict:
    return run_child(args, __file__)


def fresh(variant: str, base: list[str], threads: int) -> dict:
    """Child process: one cold run, its peak memory."""
    t0 = time.perf_counter()
    engine, ov = variant_overrides(variant, base, threads)
    with TreeMemory() as mem:
        rows = one_run(engine, ov)
    return {
        "steady_round_s": steady(rows),
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mib": mem.peak_kib / 1024,
        "final_eval_accuracy": rows[-1]["eval_accuracy"],
        "final_eval_loss": rows[-1]["eval_loss"],
    }


def scale_run(num_clients: int, extra: list[str]) -> dict:
    """Child process: one run with ``num_clients`` registered clients; its peak memory."""
    import json as json_

    from fedsim.api import run

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, TreeMemory() as mem:
        summary = run([*SCALE, f"sim.num_clients={num_clients}", *extra], output_dir=Path(tmp))
        rows = [json_.loads(line) for line in open(Path(tmp) / "metrics.jsonl")]
    return {
        "num_clients": num_clients,
        "peak_rss_mib": mem.peak_kib / 1024,
        "wall_s": time.perf_counter() - t0,
        "round_s": [r["round_time_s"] for r in rows if r["round"] >= 1],
        "client_state_bytes": summary["client_state_bytes"],
        "clients_trained": sum(r["clients_ok"] for r in rows),
    }


def scale_report(small: dict, big: dict) -> list[str]:
    per_client = (big["peak_rss_mib"] - small["peak_rss_mib"]) * 2**20
    per_client /= big["num_clients"] - small["num_clients"]
    lines = [f"scale: {' '.join(SCALE)}"]
    for r in (small, big):
        lines.append(
            f"  {r['num_clients']:6d} registered clients: peak RSS {r['peak_rss_mib']:7.0f} MiB, "
            f"rounds {', '.join(f'{t:.1f}' for t in r['round_s'])} s, run {r['wall_s']:.0f} s, "
            f"client states {r['client_state_bytes'] / 2**20:.1f} MiB"
        )
    lines.append(
        f"  memory per registered client (peak RSS slope): {per_client / 1024:.1f} KiB; "
        f"client state per trained client: "
        f"{big['client_state_bytes'] / max(big['clients_trained'], 1) / 1024:.1f} KiB"
    )
    return lines


def table(title: str, base: list[str], alt: dict, cold: dict) -> list[str]:
    steps = client_steps(base)
    plain = min(alt["plain"])
    lines = [
        f"{title}: {' '.join(base)}",
        f"{'variant':12} {'round (s)':>10} {'client-steps/s':>15} {'vs plain':>9} "
        f"{'peak RSS (MiB)':>15} {'eval loss':>10}",
    ]
    for v in cold:
        best = min(alt[v]) if v in alt else cold[v]["steady_round_s"]
        lines.append(
            f"{v:12} {best:10.4f} {steps / best:15.1f} {plain / best:9.2f} "
            f"{cold[v]['peak_rss_mib']:15.0f} {cold[v]['final_eval_loss']:10.5f}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="synthetic", help=argparse.SUPPRESS)
    parser.add_argument("--variants", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engines")
    parser.add_argument("--ray", action="store_true", help="also the ray engine (slow start)")
    parser.add_argument("--sentiment", action="store_true", help="also MiniLM sentiment")
    parser.add_argument(
        "--scale", action="store_true", help="also 2,000 and 100,000 registered clients"
    )
    parser.add_argument("--num-clients", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workloads = {
        "synthetic": [*SYNTHETIC, f"sim.rounds={args.rounds}", *args.overrides],
        "sentiment": [*SENTIMENT, "sim.rounds=3", *args.overrides],
    }
    base = workloads[args.workload]
    if args.child == "scale":
        print(json.dumps(scale_run(args.num_clients, args.overrides)))
        return
    if args.child == "alternate":
        print(json.dumps(alternate(base, args.variants.split(","), args.repeats, args.threads)))
        return
    if args.child:
        print(json.dumps(fresh(args.child, base, args.threads)))
        return

    common = ["--rounds", str(args.rounds), "--repeats", str(args.repeats)]
    common += ["--threads", str(args.threads), *args.overrides]
    report, results = [], {}
    jobs = [("synthetic", ["plain", "inline", "batched", "batched-2t"])]
    if args.sentiment:
        jobs.append(("sentiment", ["plain", "inline", "inline-2t", "batched"]))
    for workload, variants in jobs:
        w = ["--workload", workload, *common]
        alt = child(["--child", "alternate", "--variants", ",".join(variants), *w])
        names = [*variants, *(["ray"] if args.ray else [])]
        cold = {v: child(["--child", v, *w]) for v in names}
        report += table(workload, workloads[workload], alt, cold) + [""]
        results[workload] = {"overrides": workloads[workload], "alternating": alt, "fresh": cold}
    if args.scale:
        small, big = (
            child(["--child", "scale", "--num-clients", str(n), *args.overrides])
            for n in (2000, 100_000)
        )
        report += scale_report(small, big) + [""]
        results["scale"] = {"overrides": SCALE, "runs": [small, big]}
    print("\n".join(report).rstrip())
    for workload, r in results.items():
        if "alternating" not in r:  # --scale: single runs
            continue
        alt = r["alternating"]
        pairs = {v: [p / x for p, x in zip(alt["plain"], t)] for v, t in alt.items()}
        spread = {v: f"{min(p):.2f}-{max(p):.2f}" for v, p in pairs.items() if v != "plain"}
        print(f"{workload}: speed-up per alternation (plain / variant): {spread}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
