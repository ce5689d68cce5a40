"""Differences paired by seed: each strategy's final test accuracy minus a baseline strategy's,
seed by seed, within the same task and settings (each at its chosen rate, or at the same rate
when no rate was chosen), with the mean difference and its 95% t interval over the seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedsim.report.stats import paired
from fedsim.report.tables import SEED_KEYS, bound
from fedsim.report.tuning import configurations

#: the columns of ``paired.csv`` after the setting's and the strategy's
PAIRED_STATS = [
    "baseline",
    "n",
    "by_seed",
    "mean_difference",
    "ci95_half",
    "ci95_low",
    "ci95_high",
]


def baseline_of(groups: Sequence[dict[str, Any]], asked: str | None) -> tuple[str | None, str]:
    """The baseline strategy: ``asked`` when some group ran it, else ``fedavg`` when one did,
    else the first alphabetically; and a warning line when ``asked`` was not found."""
    names = sorted({str(g.get("strategy")) for g in groups})
    if not names:
        return None, ""
    if asked is not None and asked in names:
        return asked, ""
    default = "fedavg" if "fedavg" in names else names[0]
    if asked is None:
        return default, ""
    return default, (
        f"warning: --baseline {asked}: no finished run of it (strategies: {', '.join(names)}); "
        f"differences are against {default}"
    )


def _is_strategy(key: str) -> bool:
    return key == "strategy" or key.startswith("strategy.")


def differences(
    groups: Sequence[dict[str, Any]], baseline: str | None, lr_key: str | None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Per setting (the groups' identity less the strategy, its own options, the seed and the
    rate ``lr_key``), each other strategy's group against the baseline's (the one at the same
    rate when the baseline has several): the paired differences of final test accuracy.
    Empty when no two strategies share a seed."""
    if baseline is None:
        return [], []
    leave = [*SEED_KEYS] + ([lr_key] if lr_key else [])
    names = list(dict.fromkeys(k for g in groups for k, _ in g["_key"]))
    strategy_keys = [k for k in names if _is_strategy(k)]
    strategy_keys += [k for k in bound(groups, names) if k not in strategy_keys]
    by_setting = configurations(groups, [*leave, *strategy_keys])
    rate = [lr_key, "baseline_lr"] if lr_key else []
    rows = []
    for setting, members in by_setting.items():
        bases = [g for g in members if str(g.get("strategy")) == baseline]
        for g in members:
            if str(g.get("strategy")) == baseline:
                continue
            base = _counterpart(g, bases, lr_key)
            if base is None:
                continue
            d = paired(_by_seed(g), _by_seed(base))
            if d["n"] == 0:
                continue
            row = {**dict(setting), **{k: g.get(k, "") for k in strategy_keys}}
            if rate:
                row.update({lr_key: g.get(lr_key), "baseline_lr": base.get(lr_key)})
            shown = ", ".join(f"{s}: {x:+.4f}" for s, x in d["differences"].items())
            row.update(baseline=baseline, n=d["n"], by_seed=shown, mean_difference=d["mean"])
            row.update(ci95_half=d["half"], ci95_low=d["low"], ci95_high=d["high"])
            rows.append(row)
    if not rows:
        return [], []
    setting_keys = [k for k, _ in next(iter(by_setting))]
    return setting_keys + strategy_keys + rate + PAIRED_STATS, rows


def _counterpart(g: dict[str, Any], bases: Sequence[dict[str, Any]], lr_key: str | None):
    """The baseline group to compare ``g`` with: the only one, else the one at its rate."""
    if len(bases) == 1:
        return bases[0]
    same = [b for b in bases if lr_key and b.get(lr_key) == g.get(lr_key)]
    return same[0] if len(same) == 1 else None


def _by_seed(group: dict[str, Any]) -> dict[str, float | None]:
    return {str(r.get("seed")): r.get("final_accuracy") for r in group["_rows"]}
