"""What a checkpoint costs: its size and write time in real runs, and what its digest adds.

    python benchmarks/checkpoint_cost.py                # the digest on 100 MB, synthetic runs
    python benchmarks/checkpoint_cost.py --sentiment    # also MiniLM runs (minutes each)

Digest: a checkpoint of 25 float32 arrays of 1M values (100 MB) written (``checkpoint.save``,
fsync included), read (``checkpoint.load``) and pre-checked (``checkpoint.header``, which reads
the whole file to check the digest), with fedsim's SHA-256 digest and with the digest replaced
by a constant; the median and range of ``--repeats`` runs each, and SHA-256's own speed.

Runs (``checkpoint.keep=true`` keeps the last checkpoint): the synthetic task with 50 clients,
10 per round, 30 rounds (docs/reliability.md's fault runs), FedIT and Fed-SB; with
``--sentiment`` MiniLM with Fed-SB and FedEx after 2 rounds. For each: the checkpoint's size,
the time to write it again (its tree loaded, then ``checkpoint.save`` timed, median of
``--repeats``) and the run's mean training round time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SYNTHETIC = [
    "task=synthetic",
    "sim.num_clients=50",
    "sim.clients_per_round=10",
    "sim.rounds=30",
    "sim.min_clients=3",
]
RUNS = {
    "synthetic, fedavg, 50 clients": [*SYNTHETIC, "strategy=fedavg"],
    "synthetic, fedsb, 50 clients": [*SYNTHETIC, "strategy=fedsb"],
}
SENTIMENT = {
    "sentiment, fedsb, after 2 rounds": ["task=sentiment", "strategy=fedsb", "sim.rounds=2"],
    "sentiment, fedex, after 2 rounds": ["task=sentiment", "strategy=fedex", "sim.rounds=2"],
}


def timed(f, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        out.append(time.perf_counter() - start)
    return out


def shown(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.3f} s ({min(seconds):.3f}-{max(seconds):.3f})"


def digest_table(folder: Path, repeats: int) -> None:
    from fedsim import checkpoint

    rng = np.random.default_rng(0)
    tree = {"round": 1, "arrays": {f"a{i}": rng.random(1_000_000, np.float32) for i in range(25)}}
    path = folder / "checkpoint.safetensors"
    rows = {}
    for variant in ("with the digest", "without"):
        patch = (
            contextlib.nullcontext()
            if variant == "with the digest"
            else _constant_digest(checkpoint)
        )
        with patch:
            rows[variant] = [
                timed(lambda: checkpoint.save(path, tree), repeats),
                timed(lambda: checkpoint.load(path), repeats),
                timed(lambda: checkpoint.header(path), repeats),
            ]
    data = b"".join(a.tobytes() for a in tree["arrays"].values())
    sha = timed(lambda: hashlib.sha256(data).hexdigest(), repeats)
    print(f"100 MB of tensors, median (min-max) of {repeats}:\n")
    print("| 100 MB of tensors | with the digest | without |\n|---|---|---|")
    for i, what in enumerate(("write (save)", "read (load)", "pre-check (header)")):
        with_, without = rows["with the digest"][i], rows["without"][i]
        print(f"| {what} | {shown(with_)} | {shown(without)} |")
    print(f"\nSHA-256 of 100 MB: {shown(sha)}, {100 / statistics.median(sha):.0f} MB/s\n")


@contextlib.contextmanager
def _constant_digest(checkpoint):
    original = checkpoint.digest
    checkpoint.digest = lambda text, tensors: "0" * 64
    try:
        yield
    finally:
        checkpoint.digest = original


def run_table(runs: dict[str, list[str]], folder: Path, repeats: int) -> None:
    from fedsim import checkpoint
    from fedsim.api import run
    from fedsim.results import read_metrics

    print("| run | checkpoint size | write time | per round of training |\n|---|---|---|---|")
    for i, (name, overrides) in enumerate(runs.items()):
        out = folder / f"run{i}"
        with contextlib.redirect_stdout(io.StringIO()):
            run([*overrides, "checkpoint.keep=true", "export=false"], output_dir=out)
        path = out / "checkpoint.safetensors"
        tree = checkpoint.load(path)
        again = folder / f"again{i}.safetensors"
        write = timed(lambda: checkpoint.save(again, tree), repeats)  # noqa: B023
        rounds = [r["round_time_s"] for r in read_metrics(out / "metrics.jsonl")[1:]]
        size = path.stat().st_size
        print(
            f"| {name} | {size / 1e6:.2f} MB | {shown(write)} | {statistics.mean(rounds):.2f} s |"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sentiment", action="store_true", help="also MiniLM (minutes each)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        digest_table(Path(tmp), args.repeats)
        run_table({**RUNS, **(SENTIMENT if args.sentiment else {})}, Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
