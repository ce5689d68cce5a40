"""The learning rate chosen on the validation split: per configuration (everything but the rate
and the seed), the rate with the best mean validation accuracy over the seeds every rate ran;
the groups the plots draw by default (each configuration at its chosen rate); one warning line
when a chosen rate is the smallest or largest of those tried, and one for the configurations
without a validation split (no rate is chosen for them: choosing on test accuracy and
reporting test accuracy would overstate them, so their plots keep every rate)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedsim.report.stats import rate_order
from fedsim.report.tables import AGGREGATOR, LR_KEYS, OPTIONAL, bound, varying

#: the columns of ``tuned.csv`` after the configuration's
TUNED_STATS = [
    "rates_tried",
    "selected_lr",
    "val_accuracy",
    "test_accuracy_mean",
    "test_accuracy_ci95",
    "test_loss_mean",
    "seeds",
    "bytes_up",
    "bytes_down",
]
NO_VALIDATION = "no validation split (set sim.validation_fraction): no rate selected"
#: a personalised strategy (fedsa, local) has no global model, so no validation accuracy
NO_GLOBAL = "no global model (personal adapters) to validate: no rate selected"
#: the note of a configuration whose rates all scored the same on validation
TIED = "every rate tied on validation"


@dataclass
class Tuning:
    """What :func:`tune` found."""

    #: ``tuned.csv``: its columns and a row per configuration (empty when runs share one rate)
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    #: the groups the plots draw by default: each configuration at its chosen rate, and every
    #: rate of a configuration without a validation split
    chosen: list[dict[str, Any]] = field(default_factory=list)
    #: one line each: chosen rates at the edge of the grid, configurations without validation
    warnings: list[str] = field(default_factory=list)
    #: the key of the rate (``sim.lr`` when swept, else ``lr``); None when runs share one
    lr_key: str | None = None


def lr_key_of(groups: Sequence[dict[str, Any]]) -> str | None:
    """The identity key that holds the rate, when the groups tried more than one."""
    names = {k for g in groups for k, _ in g["_key"]}
    key = next((k for k in LR_KEYS if k in names), None)
    return key if key and len({str(g.get(key)) for g in groups}) > 1 else None


def configurations(groups: Sequence[dict[str, Any]], leave_out: Sequence[str]) -> dict:
    """The groups by their identity less ``leave_out`` (in the groups' order)."""
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for g in groups:
        out[tuple((k, v) for k, v in g["_key"] if k not in leave_out)].append(g)
    return out


def tune(group_columns: Sequence[str], groups: Sequence[dict[str, Any]]) -> Tuning:
    """Per configuration (all but the learning rate), the rate with the best mean validation
    accuracy and the test results at that rate; see :class:`Tuning`."""
    lr_key = lr_key_of(groups)
    if lr_key is None:
        return Tuning(chosen=list(groups))
    by_config = configurations(groups, [lr_key])
    ident = [k for k, _ in next(iter(by_config))]
    configs = [dict(c) for c in by_config]
    label_keys = [k for k in varying(configs, ident) if k not in bound(configs, ident)]
    extra = [c for c in group_columns if c.startswith(AGGREGATOR) or c in OPTIONAL]
    out, chosen, warnings, unscored, personal = [], [], [], [], []
    for config, members in by_config.items():
        members = sorted(members, key=lambda g: rate_order(str(g.get(lr_key))))
        row = {**dict(config), **_best(members, lr_key, extra)}
        out.append(row)
        name = _name(dict(config), label_keys)
        if row["selected_lr"] is None:
            (personal if row["note"] == NO_GLOBAL else unscored).append(name)
            chosen += members
            continue
        chosen += [g for g in members if g.get(lr_key) == row["selected_lr"]]
        edge = _edge(members, lr_key, row["selected_lr"])
        tried = f"{members[0].get(lr_key)} to {members[-1].get(lr_key)}"
        if _tied(members):
            row["note"] = "; ".join(x for x in (TIED, row["note"]) if x)
            warnings.append(
                f"warning: {name}: every {lr_key} tried ({tried}) gave the same validation "
                f"accuracy ({row['val_accuracy']:.4g}), so none was chosen on merit: the "
                "smallest is shown"
            )
        elif edge:
            row["note"] = "; ".join(x for x in (f"{edge} rate tried", row["note"]) if x)
            warnings.append(
                f"warning: {name}: the chosen {lr_key}={row['selected_lr']} is the {edge} "
                f"rate tried ({tried}); the best rate may lie beyond the grid"
            )
    if unscored:
        warnings.append(
            f"warning: no validation split for {', '.join(unscored)}: no rate chosen "
            "(set sim.validation_fraction), so the plots show every rate tried"
        )
    if personal:
        warnings.append(
            f"warning: {', '.join(personal)} train personal adapters (no global model, no "
            "validation accuracy): no rate chosen, so the plots show every rate tried"
        )
    cols = ident + TUNED_STATS + extra + ["note"]
    return Tuning(cols, out, chosen, warnings, lr_key)


def _best(members: Sequence[dict[str, Any]], lr_key: str, extra: Sequence[str]) -> dict:
    """The tuned row's numbers: the rates tried and the best by mean validation accuracy."""
    row: dict[str, Any] = {"rates_tried": ", ".join(str(g.get(lr_key)) for g in members)}
    scored = [g for g in members if g.get("final_val_accuracy_mean") is not None]
    if not scored:
        personal = all(g.get("final_accuracy_mean") is None for g in members)
        return {**row, "selected_lr": None, "note": NO_GLOBAL if personal else NO_VALIDATION}
    scores, on = _validation_scores(scored)
    best_at = max(range(len(scored)), key=lambda i: scores[i])  # ties: the smaller rate
    best = scored[best_at]
    notes = [] if len(members) > 1 else ["one rate tried"]
    if on:
        notes.append(on)
    row.update(
        selected_lr=best.get(lr_key),
        val_accuracy=scores[best_at],
        test_accuracy_mean=best["final_accuracy_mean"],
        test_accuracy_ci95=best["final_accuracy_ci95"],
        test_loss_mean=best["final_loss_mean"],
        seeds=best["seeds"],
        bytes_up=best["bytes_up"],
        bytes_down=best["bytes_down"],
        note="; ".join(notes),
    )
    row.update({c: best.get(c) for c in extra})
    return row


def _validation_scores(scored: Sequence[dict[str, Any]]) -> tuple[list[float], str]:
    """Each rate's score: its mean validation accuracy over the seeds every rate ran, so that a
    grid tried on seed 0 and then run on more seeds at one rate compares the rates on seed 0
    (a mean over three seeds against one seed's value would favour the luckier count), with a
    note naming those seeds; each rate's own mean, and no note, when all ran the same seeds
    or they share none."""
    by_seed = [_val_by_seed(g) for g in scored]
    shared = set.intersection(*(set(seeds) for seeds in by_seed))
    if not shared or all(set(seeds) == shared for seeds in by_seed):
        return [g["final_val_accuracy_mean"] for g in scored], ""
    scores = [sum(seeds[k] for k in shared) / len(shared) for seeds in by_seed]
    names = ", ".join(sorted(shared, key=rate_order))
    return scores, f"rate chosen on seed{'s' * (len(shared) > 1)} {names} (those every rate ran)"


def _tied(members: Sequence[dict[str, Any]]) -> bool:
    """Whether two or more rates were scored and all got the same validation score (a model
    that predicts one class at every rate scores that class's share at each)."""
    scored = [g for g in members if g.get("final_val_accuracy_mean") is not None]
    if len(scored) < 2:
        return False
    scores, _ = _validation_scores(scored)
    return max(scores) - min(scores) < 1e-12


def _edge(members: Sequence[dict[str, Any]], lr_key: str, selected: Any) -> str:
    """'smallest' or 'largest' when ``selected`` is at that end of two or more rates tried."""
    if len(members) < 2:
        return ""
    if selected == members[0].get(lr_key):
        return "smallest"
    return "largest" if selected == members[-1].get(lr_key) else ""


def _name(config: dict[str, Any], keys: Sequence[str]) -> str:
    """A configuration's name in a warning: its strategy, or what tells it apart."""
    parts = [f"{k}={config.get(k)}" for k in keys if k != "strategy"]
    if "strategy" in keys:
        parts.insert(0, str(config["strategy"]))
    return ", ".join(parts) if parts else "the runs"


def _val_by_seed(group: dict[str, Any]) -> dict[str, float]:
    """A group's final validation accuracy by seed (its runs that have one)."""
    rows = group["_rows"]
    return {
        str(r.get("seed")): r["final_val_accuracy"]
        for r in rows
        if r.get("final_val_accuracy") is not None
    }
