"""``fedsim estimate=true ...``: what a run will cost, without training it.

The configuration is checked as for a run; then the adapted model's sizes, the bytes per
client per round of the chosen strategy and compressor (:mod:`fedsim.estimate.traffic`: the
run's real messages for rounds 1 and 2, replied to with a random update), and a client's
memory on the chosen device (:mod:`fedsim.estimate.memory`: activations measured on one batch)
are printed (:mod:`fedsim.estimate.report`). Nothing is trained and no run folder is written.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

from fedsim.estimate.memory import Memory
from fedsim.estimate.sizes import ModelSizes
from fedsim.estimate.traffic import Traffic


@dataclass
class Estimate:
    """What :func:`estimate` found; :func:`fedsim.estimate.report.text` prints it."""

    cfg: dict[str, Any]
    choices: dict[str, str]
    device: str
    sizes: ModelSizes
    traffic: Traffic | None
    memory: Memory | None
    free: int | None = None  # free memory on the device, bytes (None: unknown)
    free_source: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The numbers, as plain data (what :func:`fedsim.api.run` returns for an estimate)."""
        from dataclasses import asdict

        sizes = self.sizes
        return {
            "estimate": True,
            "device": self.device,
            "model": {
                "parts": {k: asdict(v) for k, v in sizes.parts.items()},
                "total_parameters": sizes.total().numel,
                "total_bytes": sizes.total().nbytes,
                "trainable_parameters": sizes.trainable.numel,
                "frozen_parameters": sizes.frozen.numel,
                "buffer_bytes": sizes.buffers,
            },
            "traffic": None if self.traffic is None else asdict(self.traffic),
            "memory": None
            if self.memory is None
            else {**asdict(self.memory), "total": self.memory.total},
            "free_bytes": self.free,
            "notes": list(self.notes),
        }


def estimate(cfg: dict[str, Any], choices: dict[str, str] | None = None) -> Estimate:
    """The estimate of a checked configuration (see the module docstring)."""
    from fedsim.build import build_components
    from fedsim.estimate import memory as mem
    from fedsim.estimate.sizes import model_sizes

    cfg = {**cfg, "sim": {**cfg["sim"], "aggregation_error": False}}  # not measured here
    server = build_components(cfg)
    device = server.device
    notes: list[str] = []
    client = _client(cfg, notes)
    traffic = None if client is None else _traffic(server, client, notes)
    if client is None:  # the model alone, as a client builds it
        model, spec = server.model(device)
    else:
        model, spec = client.model, client.spec
    sizes = model_sizes(model, spec)
    batch = server.strategy.client_batch_size(server.sim["batch_size"])
    memory = mem.client_memory(model, spec, server, sizes, batch, device)
    del model, spec, client
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    free, source = mem.free_memory(device)
    return Estimate(
        cfg, dict(choices or {}), str(device), sizes, traffic, memory, free, source, notes
    )


def _client(cfg: dict[str, Any], notes: list[str]):
    """The client half of the run, as an engine builds it (its own components and model);
    None, with a note, if it cannot be built here."""
    import torch

    from fedsim.apps.client.runtime import ClientRuntime

    threads = torch.get_num_threads()
    try:
        return ClientRuntime(cfg)
    except Exception as e:  # noqa: BLE001 - say so, do not guess
        notes.append(f"communication not estimated: the client half failed ({_short(e)})")
        return None
    finally:
        torch.set_num_threads(threads)  # the runtime sets the engine's threads


def _traffic(server, client, notes: list[str]) -> Traffic | None:
    from fedsim.estimate.traffic import measure

    if not server.strategy.communicates:
        notes.append(f"strategy {server.strategy.name} communicates nothing (a reference)")
    try:
        return measure(server, client)
    except Exception as e:  # noqa: BLE001 - an odd combination: say so, do not guess
        notes.append(f"communication not estimated ({_short(e)})")
        return None


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= 200 else text[:197] + "..."


def show(cfg: dict[str, Any], choices: dict[str, str] | None = None, title: str = "") -> dict:
    """Estimate ``cfg`` and print it; returns :meth:`Estimate.as_dict`."""
    from fedsim.estimate.report import text

    found = estimate(cfg, choices)
    print(text(found, title), flush=True)
    return found.as_dict()


def show_jobs(jobs: list) -> None:
    """Print the estimate of each ``(overrides, composed job)`` of a command line (a sweep's
    jobs one after another, each titled with its overrides)."""
    for index, (overrides, composed) in enumerate(jobs):
        shown = " ".join(o for o in overrides if not o.startswith(("hydra.", "estimate=")))
        title = f"job {index + 1}/{len(jobs)}: {shown}" if len(jobs) > 1 else ""
        if index:
            print()
        show(composed.cfg, composed.choices, title)
