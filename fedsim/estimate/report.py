"""The estimate, printed: labelled lines with units; every number says whether it is computed
(from shapes and dtypes) or measured (on this machine, or on a random update)."""

from __future__ import annotations

from fedsim.estimate.memory import clients_that_fit
from fedsim.estimate.sizes import LABELS, PARTS, Part
from fedsim.progress import human_bytes


def text(found, title: str = "") -> str:
    """The whole printout of an :class:`~fedsim.estimate.Estimate`."""
    cfg, choices = found.cfg, found.choices
    picked = " ".join(
        f"{g}={choices[g]}" for g in ("task", "adapter", "strategy", "compressor") if g in choices
    )
    rank = cfg.get("adapter", {}).get("r")
    lines = [
        f"fedsim estimate{f' ({title})' if title else ''}: {picked}"
        + (f", rank r={rank}" if rank is not None else "")
        + f", device {found.device}; nothing is trained, no run folder is written",
        "",
        *_model(found.sizes),
        "",
        *_traffic(found.traffic, cfg["sim"], choices),
        "",
        *_memory(found),
    ]
    notes = [*found.notes, *(found.memory.notes if found.memory else [])]
    if notes:
        lines += ["", "notes:", *(f"  - {n}" for n in notes)]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    return f"{human_bytes(n)} ({round(n):,} B)" if n >= 1000 else human_bytes(n)


def _dtypes(part: Part) -> str:
    return ", ".join(f"{d} {human_bytes(b)}" for d, b in sorted(part.by_dtype.items()))


def _row(label: str, part: Part) -> str:
    dtypes = f"  [{_dtypes(part)}]" if part.by_dtype else ""
    return f"  {label:<30}{part.numel:>15,} parameters  {human_bytes(part.nbytes):>9}{dtypes}"


def _model(sizes) -> list[str]:
    lines = ["model (computed from the adapted model's tensors)"]
    lines.append(_row("total", sizes.total()))
    lines.append(_row("frozen", sizes.frozen))
    lines += [_row(f"  {LABELS[p]}", sizes.parts[p]) for p in PARTS[:2]]
    lines.append(_row("trainable", sizes.trainable))
    lines += [_row(f"  {LABELS[p]}", sizes.parts[p]) for p in PARTS[2:]]
    if sizes.buffers:
        lines.append(f"  {'buffers (frozen)':<30}{'':>26}{human_bytes(sizes.buffers):>9}")
    return lines


def first_participations(sim: dict) -> float:
    """Clients that take part at least once: all of them when every client trains every
    round; else the expectation under uniform sampling of k of N each round."""
    n, k, rounds = sim["num_clients"], sim["clients_per_round"], sim["rounds"]
    if k >= n:
        return float(n) if rounds else 0.0
    return n * (1 - (1 - k / n) ** rounds)


#: what the arrays sent at a client's first participation only are, by name prefix
ONE_TIME = {
    "frozen/*": "one-time: the adapter's frozen factors from data, at a client's first "
    "participation",
    "initial/*": "one-time: the initial personal arrays, at a client's first participation",
    "down/*": "one-time: EF21-P sends the whole model to a client that holds nothing yet",
}


def _line(label: str, value: str, comment: str = "") -> str:
    return f"  {label:<32}{value}" + (f"  ({comment})" if comment else "")


def _traffic(t, sim: dict, choices: dict) -> list[str]:
    head = "communication per client"
    if t is None:
        return [f"{head}: not estimated (see the notes)"]
    how = (
        f"measured on a random update of {t.clients} clients: coded sizes depend on the values"
        if t.value_dependent
        else "computed: these sizes depend on shapes and dtypes only"
    )
    later_down = t.down_first if t.down_later is None else t.down_later
    later_up = t.up_first if t.up_later is None else t.up_later
    lines = [
        f"{head} (the run's own messages of rounds 1 and 2, nothing trained; {how})",
        _line("downlink, first participation", _bytes(t.down_first)),
    ]
    for name, size in sorted(t.one_time.items()):
        why = ONE_TIME.get(name, "in round 1, not in round 2: the strategy's own choice")
        lines.append(_line(f"  of which {name}", _bytes(size), why))
    if t.down_later is not None:
        lines.append(_line("downlink, every later round", _bytes(t.down_later)))
    lines.append(_line("uplink, raw float32", _bytes(t.up_raw), "the arrays a client sends"))
    compressor = choices.get("compressor", "none")
    lines.append(_line(f"uplink, as sent ({compressor})", _bytes(t.up_first)))
    if t.up_later is not None and t.up_later != t.up_first:
        lines.append(_line("uplink, as sent from round 2", _bytes(t.up_later)))
    k, rounds = sim["clients_per_round"], sim["rounds"]
    first = first_participations(sim)
    total_down = first * t.down_first + (rounds * k - first) * later_down
    total_up = first * t.up_first + (rounds * k - first) * later_up
    round_one = f"round 1: {human_bytes(k * t.down_first)}"
    lines += [
        _line(
            f"per round ({k} clients)",
            f"up {human_bytes(k * later_up)}, down {human_bytes(k * later_down)}",
            round_one if t.down_first != later_down else "",
        ),
        _line(
            f"whole run ({rounds} rounds)",
            f"up {human_bytes(total_up)}, down {human_bytes(total_down)}",
            _first(first, sim),
        ),
    ]
    return lines + [f"  note: {n}" for n in t.notes]


def _first(first: float, sim: dict) -> str:
    if sim["clients_per_round"] >= sim["num_clients"]:
        return f"{round(first)} first participations"
    return f"about {first:.1f} first participations expected under uniform sampling"


def _memory(found) -> list[str]:
    m = found.memory
    if m is None:
        return ["memory: not estimated (see the notes)"]
    how = {
        "optimizer state": f"measured: {m.optimizer}, {m.states_per_value:.1f} states per "
        "trained value",
        "activations": f"measured: tensors saved for backward in one forward of the loss on "
        f"{m.batch} of the longest test examples",
        "DP-SGD per-example gradients": f"computed: {m.batch} x trainable parameters x 4 B",
    }
    lines = [f"memory per client on {found.device} (while it trains)"]
    for label, n in m.rows.items():
        lines.append(_line(label, f"{human_bytes(n):>9}", how.get(label, "computed")))
    lines.append(_line("total", f"{human_bytes(m.total):>9}"))
    return lines + _group(found)


def _group(found) -> list[str]:
    from fedsim.engines.group_size import AUTO, CPU_GROUP, MARGIN

    m, cfg = found.memory, found.cfg
    engine = cfg.get("engine", {})
    batched = str(engine.get("_target_", "")).endswith("BatchedEngine")
    given = engine.get("group_size", CPU_GROUP) if batched else CPU_GROUP
    k = cfg["sim"]["clients_per_round"]
    size = min(CPU_GROUP if given == AUTO else int(given), k)
    why = f"engine.group_size={given}" if batched else f"engine=batched's default {CPU_GROUP}"
    if size < (CPU_GROUP if given == AUTO else int(given)):
        why += f", at most the round's {k} clients"
    lines = [
        _line(
            f"batched group of {size}",
            f"{human_bytes(m.shared + size * m.per_client):>9}",
            f"{why}: {human_bytes(m.shared)} frozen base, shared, + {size} x "
            f"{human_bytes(m.per_client)} per client: trained weights, gradients, optimizer "
            "state, activations, its reply's copy",
        )
    ]
    if not batched:
        lines.append(f"  (this run's engine={engine_name(engine)} trains one client at a time)")
    if given == AUTO:
        lines.append("  (engine.group_size=auto: the run measures one vmapped step and decides)")
    if found.free is None:
        return lines + [f"  free memory on {found.device}: {found.free_source}"]
    fit, safe = clients_that_fit(m, found.free), clients_that_fit(m, found.free, MARGIN)
    lines.append(
        _line(
            "free memory",
            f"{human_bytes(found.free):>9}",
            f"{found.free_source}: a group of up to {fit} clients fits; {safe} within "
            f"{MARGIN:.0%} of it, the share engine.group_size=auto uses",
        )
    )
    if fit < 1:
        lines.append("  not even one client fits in the free memory")
    return lines


def engine_name(engine: dict) -> str:
    target = str(engine.get("_target_", "?")).rsplit(".", 1)[-1]
    return target.removesuffix("Engine").lower() or "?"
