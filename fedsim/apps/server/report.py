"""What a run reports at its end: ``summary.json``, the PEFT export, the closing line."""

from __future__ import annotations

import logging
import platform
import traceback
from typing import Any

import flwr
import torch

import fedsim
from fedsim import keys
from fedsim.apps.server.timing import summary as clock_summary
from fedsim.errors import RunFailed
from fedsim.progress import human_bytes, human_seconds
from fedsim.records import numpy_dict
from fedsim.training import describe_device, device_fields

log = logging.getLogger(__name__)
#: parameters above which a run on the CPU is told that rounds will be slow
LARGE_ON_CPU = 50_000_000
#: parameters above which engine=batched on the CPU is told it may not pay: measured by
#: benchmarks/engines.py on the 2-core machine, 4.3x the plain loop for the synthetic task's
#: 39k-parameter MLP and 0.82x for MiniLM's 22.7M (not measured in between)
BATCHED_ON_CPU = 1_000_000

#: the chosen options named in summary.json, in this order
CHOICES = (
    "task",
    "strategy",
    "adapter",
    "partition",
    "engine",
    "compressor",
    "feedback",
    "privacy",
    "faults",
)


def header(run) -> None:
    """The run's first line: its options, clients, rounds, device and folder (and a warning
    when a large model trains on the CPU)."""
    sim = run.sim
    shown = ("task", "adapter", "strategy", "partition", "engine")
    run.printer.header(
        " ".join(f"{k}={v}" for k, v in run.spec.choices.items() if k in shown)
        + f"  clients {sim['clients_per_round']}/{sim['num_clients']}  rounds {sim['rounds']}"
        + f"  device {describe_device(run.device)}"
        + f"  -> {run.spec.output_dir}"
    )
    size = sum(p.numel() for p in run.model.parameters())
    if run.device.type == "cpu" and size > LARGE_ON_CPU:
        run.printer.warning(
            f"a {size / 1e6:.0f}M-parameter model on the CPU: a round can take minutes; "
            "the progress line's ETA says how long (sim.device=cuda if a GPU is here)"
        )
    if run.device.type == "cpu" and size > BATCHED_ON_CPU and run.c.engine.name == "batched":
        run.printer.warning(
            f"engine=batched on the CPU with a {size / 1e6:.1f}M-parameter model: its vmapped "
            "groups pay for small models (4.3x the plain loop at 39k parameters) but not at "
            "this size, whose matrix products already fill a core (MiniLM: 0.82x); "
            "engine=inline is faster here, engine=ray spreads clients over cores"
        )


def summary(run, wall: float, status: str, error: str | None = None) -> dict[str, Any]:
    """summary.json of ``run`` (a :class:`~fedsim.apps.server.run.FederatedRun`)."""
    ledger, sim = run.ledger, run.sim
    last, totals = ledger.last, ledger.totals
    out = {
        "status": status,
        **{name: run.spec.choices.get(name) for name in CHOICES},
        **_server_opt(run),
        "rounds": sim["rounds"],
        "rounds_completed": last.get("round", 0),
        "rounds_skipped": totals["rounds_skipped"],
        "clients_failed_total": totals["clients_failed"],
        "clients_failed_by_kind": dict(sorted(totals["clients_failed_by_kind"].items())),
        **(
            {"faults_injected_total": dict(totals["faults_injected"])}
            if run.uplink.get("faults") is not None
            else {}
        ),
        **robustness(run),
        **({"prox_mu": sim["prox_mu"]} if sim.get("prox_mu") else {}),
        **({"control": run.c.control.name} if run.c.control.active else {}),
        "num_clients": sim["num_clients"],
        "clients_per_round": sim["clients_per_round"],
        **_final_metrics(last, run.evaluation.val_set is not None),
        "aggregation_error_max": max(ledger.aggregation_errors, default=None),
        "client_state_bytes": sum(ledger.state_bytes.values()),
        **privacy_summary(run),
        **clock_summary(run),
        "adapter_init": ledger.adapter_init,
        "export": run.export_info,
        "bytes_up_total": totals["bytes_up"],
        **({"bytes_up_raw_total": totals["bytes_up_raw"]} if "bytes_up_raw" in totals else {}),
        "bytes_down_total": totals["bytes_down"],
        "params_sent_per_client": {
            "up": totals["numel_up"] / totals["replies"] if totals["replies"] else 0,
            "down": totals["numel_down"] / totals["sent"] if totals["sent"] else 0,
        },
        "trainable_params": run.adapter_spec.num_trained(run.model),
        "wall_time_s": wall,
        "checkpoint": run.checkpoints.summary(),
        "resumed_from": ledger.resumed_from,
        "seed": sim["seed"],
        **device_fields(run.device),  # device, device_name: the machine's, not the result's
        "versions": {
            "fedsim": fedsim.__version__,
            "flwr": flwr.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if error is not None:
        out["error"] = error
    return out


def _server_opt(run) -> dict[str, Any]:
    """The server optimiser's option, when the run has one (runs without one keep the
    summary they always had)."""
    opt = run.c.server_opt
    if not opt.active:
        return {}
    return {"server_opt": run.spec.choices.get("server_opt") or opt.name}


def robustness(run) -> dict[str, Any]:
    """The robust rule (the space it works in) and the Byzantine clients, when there are."""
    out: dict[str, Any] = {}
    rule = run.c.robust
    if rule.active:
        from fedsim.robust import SPACE

        out.update(robust=rule.name, robust_settings=rule.settings(), robust_space=SPACE)
    byzantine = run.uplink.get("byzantine")
    if byzantine is not None:
        out["byzantine"] = byzantine.summary()
    return out


def _final_metrics(last: dict[str, Any], validation: bool) -> dict[str, Any]:
    out = {
        "final_eval_loss": last.get(keys.EVAL_LOSS),
        "final_eval_accuracy": last.get(keys.EVAL_ACCURACY),
        "final_eval_accuracy_client_mean": last.get("eval_accuracy_client_mean"),
        "final_eval_accuracy_client_min": last.get("eval_accuracy_client_min"),
    }
    if validation:
        out["final_val_loss"] = last.get(keys.VAL_LOSS)
        out["final_val_accuracy"] = last.get(keys.VAL_ACCURACY)
    return out


def privacy_summary(run) -> dict[str, Any]:
    """Epsilon and delta of the run (client DP-SGD: the max over clients)."""
    central = run.central
    if central is not None:
        dp = central.dp
        init = run.c.adapter.data_init
        setup = init is not None and init.client_steps > 0
        out = {
            "epsilon": central.epsilon(),
            "delta": dp.delta_for(run.sim["num_clients"]),
            "noise_multiplier": dp.sigma_value,
            "privacy": "central DP-FedAvg (user level), Poisson sampling at rate "
            f"q={dp.q:g}, {dp.kind.upper()} accountant, one step per round"
            + (" and one for the set-up round" if setup else ""),
        }
        if dp.adaptive is not None:  # Andrew et al. (2021): the update's share of the noise
            out["privacy"] += "; adaptive clipping (the update and the count of unclipped "
            out["privacy"] += "clients together: one Gaussian mechanism of noise_multiplier)"
            out["update_noise_multiplier"] = dp.update_sigma
            out["count_stddev"] = dp.count_stddev
            out["clip_norm_final"] = central.clip
        return out
    if not run.c.privacy.client_dp:
        return {}
    spent = list(run.ledger.epsilons.values())
    return {
        "epsilon": max((e for e, _ in spent), default=0.0),
        "delta": max((d for _, d in spent), default=None),
        "privacy": f"client DP-SGD (sample level), {run.c.privacy.accountant.upper()} "
        "accountant per client across rounds",
    }


def export(run, arrays) -> dict[str, Any]:
    """The global model's change as a PEFT LoRA adapter in ``adapter/`` (see
    :mod:`fedsim.export`); returns the summary's ``export`` block."""
    if not run.spec.cfg.get("export", True):
        return {"skipped": "export=false"}
    strategy = run.strategy
    if strategy.personalised:
        name = strategy.name
        return {"skipped": f"strategy {name} has no global model (personal adapters)"}
    from fedsim.export import NotFinite, export_peft

    strategy.load_global(run.model, run.adapter_spec, numpy_dict(arrays))
    task = run.c.task
    name, path = getattr(task, "model_id", None), getattr(task, "model_path", None)
    try:
        info = export_peft(
            run.model,
            run.adapter_spec,
            task.build_model(),
            tuple(task.head_modules),
            run.spec.output_dir / "adapter",
            base_model=name,
            base_changes=getattr(strategy, "base_delta", None),
            task_type=task.peft_task_type,
        )
        if path is not None and path != name:  # where this machine read the weights
            info["base_model_path"] = path
        return info
    except NotFinite as e:  # the global model itself is unusable: the run failed
        raise RunFailed(str(e)) from None
    except Exception as e:  # the run itself succeeded: say why there is no adapter
        log.debug("export failed:\n%s", traceback.format_exc())
        return {"failed": f"{type(e).__name__}: {e}"}


def done_line(summary: dict[str, Any]) -> str:
    """The run's closing line on the terminal."""
    accuracy = (
        f"accuracy {summary['final_eval_accuracy']:.4f}, "
        if summary["final_eval_accuracy"] is not None
        else f"client accuracy {summary['final_eval_accuracy_client_mean']:.4f} (personal models), "
    )
    error = summary["aggregation_error_max"]
    return (
        f"done in {summary['wall_time_s']:.1f} s: "
        + accuracy
        + f"up {human_bytes(summary['bytes_up_total'])}, "
        f"down {human_bytes(summary['bytes_down_total'])}"
        + (f", max aggregation error {error:.2e}" if error is not None else "")
        + (
            f", simulated time {human_seconds(summary['sim_time_s'])}"
            if "sim_time_s" in summary
            else ""
        )
    )
