"""GPU benchmark: a plain sequential PyTorch loop against fedsim's inline and batched engines.

    bash benchmarks/gpu.sh                          # CUDA, full sizes: < 8 minutes on one H100/H200
    bash benchmarks/gpu.sh --device cpu --tiny      # the same code on the CPU, tiny sizes
    python benchmarks/gpu.py --minutes 6 task.precision=bfloat16   # overrides go to every run

Workloads (FedAvg of LoRA, 2 rounds, no per-client evaluation, no aggregation diagnostic, no
export, no checkpoints; the same clients, batches and seeds in every variant):
  sentiment  MiniLM on Rotten Tomatoes, 64 clients per round, 8 local AdamW steps of batch 16;
  math       SmolLM2-135M on generated problems, 16 clients per round, 10 local steps of
             batch 16, a test set of 64 problems.
Variants, one after another in this one process:
  plain    benchmarks/plain_loop.py: each client trained in turn, no Flower;
  batched  fedsim's batched engine, engine.group_size=auto (the largest group that fits);
  inline   fedsim's in-process engine, client after client.
Client-steps per second: clients per round x local steps / the best round's training time
(its time less its evaluation; round 0 is evaluation only). Peak GPU memory: torch's
max_memory_allocated over the variant's run. Ratios are against the plain loop of the same
task in the same process.

How it is sized for 8 minutes on one H100/H200 (float32 without TF32, about 25 TFLOP/s in
practice). MiniLM has 11M non-embedding parameters; a batch of 16 snippets is about 640
tokens, so one client step (forward, and a backward that skips the frozen weights' gradients)
is about 3 x 2 x 11M x 640 = 42 GFLOP: the plain loop is bound by kernel launches (~1,000 per
step, ~20 ms), 2 x 64 x 8 = 1,024 client-steps take ~20 s per variant; batched, 64 clients are
2.7 TFLOP a step, ~0.15 s, 16 steps ~2.5 s. SmolLM2-135M has 106M non-embedding parameters;
16 problems are about 1,000 tokens: 0.6 TFLOP a client step, ~0.1 s launch-bound in the plain
loop, 2 x 16 x 10 = 320 client-steps ~35 s per variant; batched, 16 clients ~0.4 s a step, 20
steps ~8 s. With start-up (imports, tokenising, dequantising SmolLM2 once: ~1 minute) and
evaluation, about 3.5 minutes; the guard (--minutes, 7 by default) stops the run cleanly at
twice that estimate and prints what was measured (a variant cut short keeps its finished
rounds). On a machine without fedsim's packages (the lent GPU machines), gpu.sh installs them
from the bundle benchmarks/gpu_bundle.py makes, and the models get random weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

T_START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMMON = [
    "strategy=fedavg",
    "adapter=lora",
    "sim.rounds=2",
    "sim.eval_clients=0",
    "sim.aggregation_error=false",
    "export=false",
    "checkpoint.every=0",
]
WORKLOADS = {
    "sentiment": [
        "task=sentiment",
        "sim.num_clients=64",
        "sim.clients_per_round=64",
        "sim.local_steps=8",
        "sim.batch_size=16",
    ],
    "math": [
        "task=math",
        "sim.num_clients=16",
        "sim.clients_per_round=16",
        "sim.local_steps=10",
        "sim.batch_size=16",
        "task.test_examples=64",
    ],
}
#: --tiny: sizes for a CPU check of the whole path in a minute or two
TINY = {
    "sentiment": ["sim.num_clients=8", "sim.clients_per_round=8", "sim.local_steps=2"]
    + ["sim.batch_size=8", "task.test_examples=32"],
    "math": ["sim.rounds=1", "sim.num_clients=2", "sim.clients_per_round=2", "sim.local_steps=1"]
    + ["sim.batch_size=2", "task.test_examples=2", "task.answer_tokens=2"],
}
VARIANTS = ("plain", "batched", "inline")
#: what the batched engine must reach against the plain loop on sentiment (issue 25)
GOAL = 10.0


class OutOfTime(BaseException):
    """The time guard's alarm (a BaseException: fedsim's handlers of client errors let it by)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU check)")
    parser.add_argument(
        "--minutes", type=float, default=7.0, help="time budget: stop cleanly after it"
    )
    parser.add_argument("--tasks", default="sentiment,math", help="comma-separated workloads")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for gpu.json and gpu.md (default: $OUT, else benchmarks/results)",
    )
    parser.add_argument(
        "--random-weights",
        type=Path,
        help="a bundle's models/ folder (benchmarks/gpu_bundle.py): the models' architectures "
        "with random weights",
    )
    parser.add_argument("overrides", nargs="*", help="fedsim overrides for every run")
    args = parser.parse_args(argv)
    args.tasks = _names(parser, "--tasks", args.tasks, WORKLOADS)
    args.variants = _names(parser, "--variants", args.variants, VARIANTS)
    if args.minutes <= 0:
        parser.error("--minutes must be > 0")
    if args.out is None:
        args.out = (
            Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
        )
    return args


def _names(parser, flag: str, value: str, known) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"{flag}: {','.join(unknown) or 'none given'}; known: {', '.join(known)}")
    return names


def overrides_for(task: str, device: str, tiny: bool, extra: list[str]) -> list[str]:
    """The overrides of one workload (the batched engine's group size is added per variant)."""
    sizes = TINY[task] if tiny else []
    return [*COMMON, *WORKLOADS[task], *sizes, f"sim.device={device}", *extra]


def effective(overrides: list[str]) -> list[str]:
    """``overrides`` with each key once, at its last value (what the run uses)."""
    last = {o.partition("=")[0]: o for o in overrides}
    return list(last.values())


def client_steps(overrides: list[str]) -> int:
    """Client-steps of one training round: clients per round x local steps."""
    from fedsim.config import compose

    sim = compose(overrides)[0]["sim"]
    return sim["clients_per_round"] * sim["local_steps"]


def train_times(rows: list[dict]) -> list[float]:
    """Each training round's time less its evaluation (round 0 is evaluation only)."""
    return [r["round_time_s"] - r.get("eval_time_s", 0.0) for r in rows if r["round"] >= 1]


# ----------------------------------------------------------------------------- GPU


def _cuda(device: str) -> bool:
    import torch

    return device == "cuda" and torch.cuda.is_available()


def gpu_start(device: str) -> None:
    """Free what the last variant left and start a new peak (CUDA only)."""
    gc.collect()
    if _cuda(device):
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak(device: str) -> int | None:
    if not _cuda(device):
        return None
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


# ----------------------------------------------------------------------------- runs


def run_variant(variant: str, overrides: list[str], device: str) -> dict:
    """One variant's run; its per-round rows, status and peak GPU memory. Out of time or
    failed, the rounds it finished are kept."""
    from fedsim.config import compose
    from fedsim.results import read_metrics

    rows: list[dict] = []
    status, t0 = "ok", time.monotonic()
    gpu_start(device)
    with tempfile.TemporaryDirectory(prefix="fedsim-gpu-") as tmp:
        out = Path(tmp) / "run"
        try:
            if variant == "plain":
                from benchmarks.plain_loop import plain_fedavg

                plain_fedavg(compose(overrides)[0], records=rows)
            else:
                from fedsim.api import run

                extra = ["engine.group_size=auto"] if variant == "batched" else []
                run([*overrides, f"engine={variant}", *extra, "quiet=true"], output_dir=out)
        except OutOfTime:
            status = "out of time"
        except Exception as e:  # noqa: BLE001 - one variant's failure is a result too
            status = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        if variant != "plain" and (out / "metrics.jsonl").exists():
            rows = read_metrics(out)
    peaks = [r["gpu_peak_mem_bytes"] for r in rows if "gpu_peak_mem_bytes" in r]
    return {
        "variant": variant,
        "status": status,
        "wall_s": time.monotonic() - t0,
        "train_s": train_times(rows),
        "peak_gpu_bytes": gpu_peak(device),
        "metrics_gpu_peak_bytes": max(peaks) if peaks else None,
    }


def rate(result: dict, steps: int) -> float | None:
    """Client-steps per second of the variant's best round (None: no round finished)."""
    times = [t for t in result["train_s"] if t > 0]
    return steps / min(times) if times else None


# ----------------------------------------------------------------------------- report


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def table(results: dict[str, dict]) -> list[str]:
    """A markdown table: each task's variants with client-steps per second and their ratio to
    the plain loop of the same task (the same run)."""
    lines = [
        "| task | variant | rounds timed | best round (s) | client-steps/s | vs plain | "
        "peak GPU memory | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, r in results.items():
        steps = r["client_steps"]
        plain = next((v for v in r["variants"] if v["variant"] == "plain"), None)
        base = rate(plain, steps) if plain else None
        for v in r["variants"]:
            speed = rate(v, steps)
            best = f"{min(v['train_s']):.3f}" if v["train_s"] else "-"
            ratio = f"{speed / base:.2f}x" if speed and base else "-"
            shown = f"{speed:.1f}" if speed else "-"
            lines.append(
                f"| {task} | {v['variant']} | {len(v['train_s'])} | {best} | {shown} | {ratio} | "
                f"{human_bytes(v['peak_gpu_bytes'])} | {v['status']} |"
            )
    return lines


def goal_line(results: dict[str, dict]) -> str | None:
    """Whether batched reached :data:`GOAL` x the plain loop on sentiment."""
    r = results.get("sentiment")
    if r is None:
        return None
    by = {v["variant"]: rate(v, r["client_steps"]) for v in r["variants"]}
    if not by.get("plain") or not by.get("batched"):
        return "goal (batched >= 10x plain on sentiment): not measured"
    ratio = by["batched"] / by["plain"]
    verdict = "met" if ratio >= GOAL else "not met"
    return f"goal (batched >= {GOAL:g}x plain on sentiment): {ratio:.2f}x, {verdict}"


def device_line(device: str) -> str:
    import platform

    import torch

    if _cuda(device):
        name = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory
        where = f"cuda:{torch.cuda.current_device()} ({name}, {human_bytes(total)})"
    else:
        where = f"cpu ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    return f"device {where}; torch {torch.__version__}"


def report(args: argparse.Namespace, results: dict[str, dict], stopped: bool) -> str:
    """The markdown the run prints and writes: the settings, the table, the goal."""
    wall = time.monotonic() - T_START
    lines = [
        f"GPU benchmark ({'tiny' if args.tiny else 'full'} sizes): {device_line(args.device)}; "
        f"{wall:.0f} s in all"
        + (f" (stopped by the {args.minutes:g}-minute guard)" if stopped else ""),
        "",
        *table(results),
        "",
    ]
    if args.random_weights is not None:
        lines.append("- weights: random, the models' own architectures (--random-weights)")
    for task, r in results.items():
        shown = " ".join(effective(r["overrides"]))
        lines.append(f"- {task}: {r['client_steps']} client-steps a round; {shown}")
    goal = goal_line(results)
    if goal:
        note = "" if args.device == "cuda" and not args.tiny else " (not the goal's workload)"
        lines += ["", goal + note]
    return "\n".join(lines) + "\n"


def write(out: Path, text: str, results: dict, args: argparse.Namespace) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu" if args.device == "cuda" else "gpu-cpu"
    stem += "-tiny" if args.tiny else ""
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(text)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    js.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    return [md, js]


def _alarm(signum, frame) -> None:
    raise OutOfTime


def measure(args: argparse.Namespace, results: dict[str, dict], scratch: Path) -> bool:
    """Every task's variants in turn, into ``results``; True if the time guard stopped it."""
    models: dict[str, list[str]] = {}
    if args.random_weights is not None:
        from benchmarks.gpu_bundle import random_models

        models = random_models(args.random_weights, scratch)
    for task in args.tasks:
        extra = [*models.get(task, []), *args.overrides]
        overrides = overrides_for(task, args.device, args.tiny, extra)
        entry = {"overrides": overrides, "client_steps": client_steps(overrides), "variants": []}
        results[task] = entry
        for variant in args.variants:
            print(f"gpu.py: {task} {variant} ...", file=sys.stderr, flush=True)
            result = run_variant(variant, overrides, args.device)
            entry["variants"].append(result)
            print(
                f"gpu.py: {task} {variant}: {result['status']}, {result['wall_s']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            if result["status"] == "out of time":
                return True
    return False


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    args = parse_args(argv)
    if args.device == "cuda" and not _cuda("cuda"):
        raise SystemExit("gpu.py: --device cuda, but torch sees no CUDA device (--device cpu?)")
    results: dict[str, dict] = {}
    left = args.minutes * 60 - (time.monotonic() - T_START)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))
    try:
        with tempfile.TemporaryDirectory(prefix="fedsim-gpu-models-") as scratch:
            stopped = measure(args, results, Path(scratch))
    except OutOfTime:  # between variants (composing a configuration)
        stopped = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    text = report(args, results, stopped)
    print(text)
    for path in write(args.out, text, results, args):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
