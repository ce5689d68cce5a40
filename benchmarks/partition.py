"""Time and memory of a partition: flwr-datasets' partitioner against fedsim's.

    python benchmarks/partition.py                      # 1,000, 10,000 and 100,000 clients
    python benchmarks/partition.py --clients 1000 10000 --repeats 3
    python benchmarks/partition.py --flwr-max 100000    # flwr-datasets at 100,000 too (slow)
    python benchmarks/partition.py --partition pathological --clients 1000 10000

The dataset is what :class:`fedsim.data.FederatedData` gives a partitioner: an ``idx`` column
(the row number) and a ``label`` column, here 256 rows per client with 10 classes drawn
uniformly (seed 0). Both partitioners take ``conf/partition/<--partition>.yaml``'s settings
(``dirichlet``, the default: ``alpha`` 0.5, ``min_partition_size`` 10, no self-balancing,
shuffled; ``pathological``: 2 classes a client, ``first-deterministic``, shuffled; ``iid``:
none), ``seed`` 42.

``assign`` is the first call, which partitions everything (flwr-datasets: ``load_partition(0)``;
fedsim: ``partition_sizes()``); ``read`` then gets every partition's row indices, as fedsim
needs all the sizes (flwr-datasets: ``load_partition(p)`` and its ``idx`` column through Arrow;
fedsim: ``partition_indices(p)``; the ``via load_partition`` row reads fedsim's partitions
the flwr-datasets way, the drop-in path). Times are the lowest of ``--repeats`` runs. The
memory is a separate run of the assignment under ``tracemalloc``: ``peak`` is the most
allocated at once while assigning, ``kept`` what the partitioner holds afterwards (Python
objects and numpy arrays; Arrow's buffers, such as the dataset itself, are not traced).
flwr-datasets runs up to ``--flwr-max`` clients (10,000 by default: at 100,000 its per-row
Python lists would take minutes). Where both run, ``agree`` says whether every partition got
the same rows in the same order (so the same sizes).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PER_CLIENT, CLASSES, SEED = 256, 10, 42
#: the partitions measured: their class (fedsim.partitioners and flwr_datasets.partitioner)
PARTITIONS = {
    "dirichlet": "DirichletPartitioner",
    "iid": "IidPartitioner",
    "pathological": "PathologicalPartitioner",
}
#: the keys of conf/partition/<name>.yaml set here rather than taken from it
SET_HERE = ("_target_", "num_partitions", "seed")


def settings(partition: str) -> dict:
    """conf/partition/<partition>.yaml's settings, ``seed`` :data:`SEED` when it has one."""
    import yaml

    conf = yaml.safe_load((ROOT / "conf" / "partition" / f"{partition}.yaml").read_text())
    out = {key: value for key, value in conf.items() if key not in SET_HERE}
    return out | ({"seed": SEED} if "seed" in conf else {})


def dataset(clients: int):
    from datasets import Dataset

    n = clients * PER_CLIENT
    labels = np.random.default_rng(0).integers(0, CLASSES, n)
    return Dataset.from_dict({"idx": np.arange(n), "label": labels})


def make(name: str, data, clients: int, partition: str):
    """The partitioner ``name`` of ``partition`` with the dataset, nothing assigned yet."""
    import flwr_datasets.partitioner

    import fedsim.partitioners

    library = flwr_datasets.partitioner if name == "flwr-datasets" else fedsim.partitioners
    cls = getattr(library, PARTITIONS[partition])
    partitioner = cls(num_partitions=clients, **settings(partition))
    partitioner.dataset = data
    return partitioner


def assign(name: str, partitioner) -> None:
    """The first call, which assigns every partition."""
    if name == "flwr-datasets":
        partitioner.load_partition(0)
    else:
        partitioner.partition_sizes()


def read(name: str, partitioner, clients: int) -> list[np.ndarray]:
    """Every partition's row indices."""
    if name == "fedsim":
        return [partitioner.partition_indices(p) for p in range(clients)]
    # through load_partition, as flwr-datasets gives them
    return [
        partitioner.load_partition(p).with_format("arrow")[:].column("idx").to_numpy()
        for p in range(clients)
    ]


def run(name: str, data, clients: int, partition: str) -> tuple[float, float, list]:
    """(assign seconds, read seconds, every partition's row indices)."""
    partitioner = make(name, data, clients, partition)
    start = time.perf_counter()
    assign(name, partitioner)
    assigned = time.perf_counter()
    rows = read(name, partitioner, clients)
    return assigned - start, time.perf_counter() - assigned, rows


def memory(name: str, data, clients: int, partition: str) -> tuple[float, float]:
    """(peak MiB during the assignment, MiB the partitioner keeps) under tracemalloc."""
    partitioner = make(name, data, clients, partition)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    assign(name, partitioner)
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (peak - base) / 2**20, (kept - base) / 2**20


def measure(clients: list[int], flwr_max: int, repeats: int, partition: str) -> list[dict]:
    results = []
    for n in clients:
        data = dataset(n)
        both = n <= flwr_max
        names = ["flwr-datasets", "fedsim", "fedsim, via load_partition"] if both else ["fedsim"]
        reference = None
        for name in names:
            times = [run(name, data, n, partition) for _ in range(repeats)]
            assign, read = min(t[0] for t in times), min(t[1] for t in times)
            rows = times[-1][2]
            if reference is None:
                reference = rows
            agree = len(rows) == len(reference) and all(
                np.array_equal(a, b) for a, b in zip(rows, reference)
            )
            peak, kept = memory(name, data, n, partition)
            sizes = [len(r) for r in rows]
            results.append(
                dict(clients=n, examples=n * PER_CLIENT, partitioner=name, assign_s=assign)
                | dict(read_s=read, peak_mib=peak, kept_mib=kept, min_size=min(sizes))
                | dict(agree=agree if both else None)
            )
            print(f"  done: {n} clients, {name}", file=sys.stderr, flush=True)
        del data
        gc.collect()
    return results


def table(results: list[dict], repeats: int, partition: str) -> None:
    print(
        f"{PER_CLIENT} examples per client, {CLASSES} classes, conf/partition/{partition}.yaml "
        f"settings, seed {SEED}; seconds (lowest of {repeats}), tracemalloc MiB"
    )
    head = f"{'clients':>8} {'examples':>11} {'partitioner':27} {'assign':>7} {'read':>7}"
    print(f"{head} {'total':>7} {'peak':>8} {'kept':>8} {'min size':>8} {'agree':>6}")
    for r in results:
        agree = "-" if r["agree"] is None else ("yes" if r["agree"] else "NO")
        total = r["assign_s"] + r["read_s"]
        print(
            f"{r['clients']:>8,} {r['examples']:>11,} {r['partitioner']:27} "
            f"{r['assign_s']:>7.2f} {r['read_s']:>7.2f} {total:>7.2f} "
            f"{r['peak_mib']:>8.1f} {r['kept_mib']:>8.1f} {r['min_size']:>8} {agree:>6}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument(
        "--flwr-max", type=int, default=10000, help="run flwr-datasets up to this many clients"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of every case")
    parser.add_argument("--partition", choices=sorted(PARTITIONS), default="dirichlet")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = measure(args.clients, args.flwr_max, args.repeats, args.partition)
    table(results, args.repeats, args.partition)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
