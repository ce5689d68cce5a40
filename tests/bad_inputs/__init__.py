"""The table of bad inputs (tests/test_bad_inputs.py): each case is one ``fedsim`` command that
must fail with one line on stderr, no traceback, its exit status, and no file of an earlier
run changed.

Each module of this package lists its cases in ``CASES``. A case's arguments may name
``{run}`` (a copy of a prepared run folder: ``finished`` or ``stopped``, as ``folder`` says)
and ``{tmp}`` (the case's own scratch folder, also the command's working directory, where the
default ``results/`` goes); ``prepare(run, tmp)`` damages the copy or writes input files
before the command runs. ``STOPPED_ARGS`` are the arguments that made both prepared runs
(``resume=true`` with them continues the stopped one). ``beside`` starts a run first, into
``{run}``, and runs the case's command once that run has written its first round.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: the arguments of both prepared runs (the synthetic task, FedAvg, 4 clients, 3 rounds);
#: the stopped one was killed after its checkpoint of round 1
STOPPED_ARGS = (
    "task=synthetic",
    "strategy=fedavg",
    "task.examples_per_client=64",
    "task.test_examples=200",
    "task.hidden_dim=32",
    "sim.num_clients=4",
    "sim.clients_per_round=4",
    "sim.rounds=3",
    "sim.local_steps=3",
    "sim.batch_size=16",
    "sim.lr=0.01",
    "quiet=true",
)
#: a small run for cases that change one thing of it
SMALL = STOPPED_ARGS
#: a run long enough (a minute or so on two busy cores) to still be going when a case's
#: command starts beside it
LONG = (*STOPPED_ARGS, "sim.rounds=300", "sim.local_steps=20", "checkpoint.every=1")


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    #: a piece of the one line the command prints on stderr
    says: str
    #: the exit status: 2 for a configuration mistake or a damaged file, 1 for a failed run
    code: int = 2
    #: None, "finished" or "stopped": which prepared run is copied to {run}
    folder: str | None = None
    prepare: Callable[[Path, Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: a run started first (its fedsim arguments) that is still going when the case's command
    #: runs: the case must not disturb it (its .hydra/ record and config.yaml unchanged, and it
    #: finishes ok)
    beside: tuple[str, ...] | None = None
    #: the outcome depends on what else runs on the machine (Ray's ``auto`` attaches to any
    #: Ray it finds here): run by its own test, never beside another case, and while no
    #: other test starts a Ray (tests.conftest.ray_on_this_machine)
    alone: bool = False


def small(*extra: str) -> tuple[str, ...]:
    """The small run's arguments with ``extra`` (later ones win, as on the command line)."""
    return (*SMALL, *extra)
