"""The share of a synthetic run's round time spent entropy-coding payloads.

    python benchmarks/coding_share.py                   # Top-K 1%, ComPEFT 10%, QSGD 4 bits
    python benchmarks/coding_share.py --repeats 1
    python benchmarks/coding_share.py --numpy           # small tensors on the numpy path too

Each compressor runs ``fedsim task=synthetic strategy=fedavg`` (10 clients, all sampled, 5
rounds of 10 local steps, the inline engine) with the coders of
:mod:`fedsim.compression.coding` (``encode_positions``, ``decode_positions``, ``encode_levels``,
``decode_levels``) wrapped with timers where the compressors call them; every message is
encoded by its client, decoded by the client for its memory and decoded by the server. The
share is the coders' seconds over the run's summed ``round_time_s`` (training rounds and
round 0, evaluation included), the lowest of ``--repeats`` runs. Call counts and the mean time
per call are printed too. ``--numpy`` sends every input through the numpy coders (the same
bytes), as fedsim did before small inputs took the pure-Python path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CODERS = ("encode_positions", "decode_positions", "encode_levels", "decode_levels")
#: name -> the compressor's overrides
COMPRESSORS = {
    "Top-K 1%": ["compressor=topk", "compressor.ratio=0.01"],
    "ComPEFT 10%": ["compressor=compeft", "compressor.ratio=0.1"],
    "QSGD 4 bits": ["compressor=qsgd", "compressor.bits=4"],
}


@contextlib.contextmanager
def timed_coders(spent: dict[str, list[float]]):
    """The coders, where the compressors import them, wrapped to add each call's seconds."""
    import fedsim.compression.qsgd as qsgd
    import fedsim.compression.sparse as sparse

    saved = []
    for module in (sparse, qsgd):
        for name in CODERS:
            if not hasattr(module, name):
                continue
            original = getattr(module, name)

            def wrapper(*args, _f=original, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return _f(*args, **kwargs)
                finally:
                    spent.setdefault(_name, []).append(time.perf_counter() - start)

            saved.append((module, name, original))
            setattr(module, name, wrapper)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def one_run(overrides: list[str], folder: Path) -> tuple[float, float, dict]:
    """``(coding seconds, round seconds, {coder: (calls, seconds)})`` of one run."""
    from fedsim.api import run
    from fedsim.results import read_metrics

    spent: dict[str, list[float]] = {}
    base = ["task=synthetic", "strategy=fedavg", "export=false", "checkpoint.every=0"]
    with timed_coders(spent), contextlib.redirect_stdout(io.StringIO()):
        run([*base, *overrides], output_dir=folder)
    rounds = sum(r["round_time_s"] for r in read_metrics(folder / "metrics.jsonl"))
    calls = {name: (len(v), sum(v)) for name, v in spent.items()}
    return sum(s for _, s in calls.values()), rounds, calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--numpy", action="store_true", help="no pure-Python path")
    args = parser.parse_args(argv)
    if args.numpy:
        import fedsim.compression.coding as coding

        coding.SMALL_ENCODE = coding.SMALL_DECODE = coding.SMALL_LEVELS = 0
    print("| compressor | coding s | rounds s | share | calls (mean us each) |")
    print("|---|---|---|---|---|")
    calls_done: list = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in COMPRESSORS.items():
            best = None
            for _ in range(args.repeats):
                got = one_run(overrides, Path(tmp) / f"{len(calls_done)}")
                calls_done.append(got)
                if best is None or got[0] / got[1] < best[0] / best[1]:
                    best = got
            coding, rounds, calls = best
            each = ", ".join(f"{n} {c} ({1e6 * s / c:.0f})" for n, (c, s) in sorted(calls.items()))
            share = f"{100 * coding / rounds:.1f}%"
            print(f"| {label} | {coding:.3f} | {rounds:.2f} | {share} | {each} |")


if __name__ == "__main__":
    main()
