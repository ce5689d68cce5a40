"""The server's state between rounds, in one object, and the checkpoints that save it.

:class:`ServerState` gathers everything the server carries from one round to the next: the
global arrays, the strategy's own state (folded changes, personal initial values, a plug-in's
state), each stage's server state (the frozen factors and who holds them, EF21-P's ``w``,
error feedback's server mean and absorbed rounds, the central accountant), the server
optimiser's moments, the ledger's running totals and the random states. A checkpoint is that
state's tree plus every client's ``Context.state`` (:mod:`fedsim.checkpoint` writes it
atomically); restoring it puts the server, the strategy, the stages, the server optimiser and
every client back where they were.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import fedsim
from fedsim import checkpoint
from fedsim.checkpoint import CHECKPOINT_FILE, FORMAT, UNDIGESTED
from fedsim.errors import RunFailed
from fedsim.records import array_record, numpy_dict
from fedsim.resume import comparable, with_later_keys


class ServerState:
    """The server's state (see the module docstring): its parts, and their tree."""

    def __init__(self, strategy, uplink, ledger, server_opt=None) -> None:
        self.strategy, self.uplink, self.ledger = strategy, uplink, ledger
        self.server_opt = server_opt

    def tree(self, server_round: int, arrays, t_start: float) -> dict[str, Any]:
        return {
            "round": server_round,
            "arrays": numpy_dict(arrays),
            "strategy": self.strategy.state_dict(),
            "uplink": self.uplink.state_dict(),
            **self._server_opt_state(),
            "run": self.ledger.state_dict(t_start),
            "rng": checkpoint.rng_state(),
        }

    def restore(self, tree: dict[str, Any]):
        """Put every part back; returns the global arrays (an ArrayRecord)."""
        self.ledger.load_state_dict(tree["run"], int(tree["round"]))  # first: a failure
        self.strategy.load_state_dict(tree["strategy"])  # below still reports the rounds done
        self.uplink.load_state_dict(tree["uplink"])
        if self.server_opt is not None and self.server_opt.active:
            self.server_opt.load_state_dict(tree.get("server_opt", {}))
        checkpoint.set_rng_state(tree["rng"])
        return array_record(tree["arrays"])

    def _server_opt_state(self) -> dict[str, Any]:
        """The server optimiser's moments (none when it is off: the tree stays as before)."""
        if self.server_opt is None or not self.server_opt.active:
            return {}
        return {"server_opt": self.server_opt.state_dict()}


def upgrade(tree: dict[str, Any], stages: list[str]) -> dict[str, Any]:
    """A format-1 tree (the stages' state was kept by the strategy and by hand) in the current
    format (2 and 3 share the tree's layout; 3 added the file's digest).

    Format 1 kept the frozen factors, which clients hold them and the rounds whose compressed
    messages were absorbed in the strategy's state, and error feedback's, EF21-P's and the
    central accountant's states beside it."""
    strategy = dict(tree["strategy"])  # a strategy that did not extend super() kept none
    frozen = {"frozen": strategy.pop("frozen", {}), "has_frozen": strategy.pop("has_frozen", [])}
    absorbed = strategy.pop("absorbed", {})
    if "initial_personal" in strategy:  # personal strategies sent initial values alongside
        strategy["has_initial"] = list(frozen["has_frozen"])
    uplink: dict[str, Any] = {}
    if "frozen" in stages:
        uplink["frozen"] = frozen
    if tree.get("downlink") is not None:
        uplink["downlink"] = tree["downlink"]
    if tree.get("feedback") is not None:
        uplink["compression"] = {"feedback": tree["feedback"], "absorbed": absorbed}
    if tree.get("central") is not None:
        uplink["central_dp"] = tree["central"]
    rest = {k: v for k, v in tree.items() if k not in ("feedback", "downlink", "central")}
    return {**rest, "format": FORMAT, "strategy": strategy, "uplink": uplink}


class Checkpoints:
    """When the run writes its checkpoint, where, and reading one back (``checkpoint`` keys:
    ``every`` N rounds, ``keep`` the last one once the run has finished)."""

    def __init__(self, spec, can_save: bool) -> None:
        self.spec = spec
        ck = spec.cfg.get("checkpoint", {})
        self.every = int(ck.get("every", 1))
        self.keep = bool(ck.get("keep", False))
        self.can_save = can_save  # the engine keeps client states where the server sees them
        self.why_not = (
            "this engine keeps client states in its own processes; checkpoints need "
            "engine=inline or engine=batched"
        )
        self.info: dict[str, Any] = {"every": self.every, "written": 0}

    @property
    def path(self) -> Path:
        return self.spec.output_dir / CHECKPOINT_FILE

    def due(self, server_round: int, rounds: int) -> bool:
        """After ``server_round`` (the last round only with ``checkpoint.keep``: a finished run
        needs none)."""
        if self.every == 0 or not self.can_save:
            return False
        last = server_round == rounds
        return not ((server_round % self.every and not last) or (last and not self.keep))

    def save(self, tree: dict[str, Any], clients: dict[int, Any]) -> None:
        t0 = time.perf_counter()
        spec = self.spec
        full = {
            "format": FORMAT,
            "round": tree["round"],
            "config": comparable(spec.cfg),
            "choices": dict(spec.choices),
            "fedsim": fedsim.__version__,
            **tree,
            "clients": {c: checkpoint.record_dict_state(s) for c, s in clients.items()},
        }
        full["run"] = {**tree["run"], "checkpoints_written": self.info["written"] + 1}
        size = checkpoint.save(self.path, full)
        self.info.update(
            written=self.info["written"] + 1,
            last_round=tree["round"],
            bytes=size,
            write_time_s=time.perf_counter() - t0,
        )

    def drop(self) -> None:
        """A finished run keeps its checkpoint only with ``checkpoint.keep``."""
        tmp = self.path.with_name(f".{CHECKPOINT_FILE}.tmp")  # a kill mid-write
        tmp.unlink(missing_ok=True)
        if not self.keep and self.path.exists():
            self.path.unlink()
            checkpoint.sync_folder(self.spec.output_dir)

    def load(self, writer, stages: list[str]) -> dict[str, Any]:
        """Read the checkpoint to resume from (format 1 upgraded), and cut ``metrics.jsonl``
        back to its round."""
        spec = self.spec
        try:
            tree = checkpoint.load(spec.resume)
        except ValueError as e:
            raise RunFailed(str(e)) from None
        if tree.get("format") not in (*UNDIGESTED, FORMAT):
            raise RunFailed(
                f"{spec.resume} has checkpoint format {tree.get('format')}; this fedsim "
                f"reads formats {', '.join(map(str, UNDIGESTED))} and {FORMAT}"
            )
        if comparable(with_later_keys(tree["config"], spec.cfg)) != comparable(spec.cfg):
            raise RunFailed(f"{spec.resume} belongs to another configuration")
        if tree["format"] == 1:
            try:
                tree = upgrade(tree, stages)
            except (KeyError, TypeError, ValueError) as e:
                msg = f"{spec.resume} cannot be read as a format-1 checkpoint: {e}"
                raise RunFailed(msg) from None
        try:
            writer.resume(int(tree["round"]))
        except ValueError as e:
            raise RunFailed(str(e)) from None
        return tree

    def restored(self, tree: dict[str, Any]) -> None:
        """The counters of a resumed run."""
        self.info["written"] = int(tree["run"]["checkpoints_written"])
        self.info["last_round"] = int(tree["round"])

    def summary(self) -> dict[str, Any]:
        """The summary's ``checkpoint`` block."""
        if self.every and not self.can_save:
            return {
                "every": self.every,
                "written": 0,
                "skipped": self.why_not,
            }
        return {**self.info, "kept": self.keep}
