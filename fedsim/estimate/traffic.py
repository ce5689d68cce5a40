"""Bytes per client per round, from the run's real messages: the strategy and its uplink chain
build rounds 1 and 2 for a few clients, whose client half (the strategy's and the chain's,
the compressor's codec included) replies to each with a random update of the trained
parameters instead of training. What is counted is what a run's ``bytes_down`` and
``bytes_up`` count (:meth:`~fedsim.strategy.AdapterStrategy.traffic`).

Sizes that depend only on shapes and dtypes (no compressor) are exact; coded sizes (a
compressor, EF21-P's downlink) depend on the values and are measured on the random update.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsim import keys
from fedsim.build import Components

#: clients whose replies are built (their sizes averaged): enough for a coded size's spread
CLIENTS = 4


@dataclass
class Traffic:
    """Bytes per client: downlink at the first participation and later, uplink (raw: the
    float32 arrays the strategy aggregates; sent: what travels, coded by the compressor)."""

    down_first: float = 0.0
    down_later: float | None = None
    #: array name groups (``frozen/*``) sent only at a client's first participation -> bytes
    one_time: dict[str, float] = field(default_factory=dict)
    up_raw: float = 0.0
    up_first: float = 0.0
    up_later: float | None = None
    clients: int = 0  # clients whose replies were built
    #: the sent sizes depend on the values (a compressor or a coded downlink)
    value_dependent: bool = False
    notes: list[str] = field(default_factory=list)


def measure(server: Components, client) -> Traffic:
    """Rounds 1 and 2 through the real messages (``server``: the run's components, as the
    server builds them; ``client``: a :class:`~fedsim.apps.client.runtime.ClientRuntime`,
    the client half with its own components, as an engine's clients have)."""
    with _identity():
        return _measure(server, client)


@contextmanager
def _identity():
    """Flower's identity of the task this process runs (messages read it), as the inline
    engine sets it; the previous one afterwards."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    before = {n: getattr(TaskIdentity, n) for n in names}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(TaskIdentity, name, value)


def _measure(server: Components, client) -> Traffic:
    sim = server.sim
    # coded payloads, and clients that prune what they send as they train (HetLoRA)
    coded = server.compresses or server.downlink.active or not server.strategy.compressible
    out = Traffic(value_dependent=coded)
    if _without_faults(client.uplink):
        out.notes.append(
            "faults: injected crashes, stragglers and corrupted updates are left out (the "
            "sizes are a replying client's)"
        )
    out.notes += setup_notes(server)
    fed, arrays = _federation(server, client)
    sent = list(fed.configure_train(1, arrays, ConfigRecord(), None))
    if not sent:
        out.notes.append("round 1 sampled no client (central DP's Poisson sampling)")
        return out
    out.down_first = server.strategy.traffic(sent)[0] / len(sent)
    contexts = {m.metadata.dst_node_id: _context(fed, m, sim) for m in sent}
    want = max(CLIENTS, server.strategy.min_updates())  # a robust rule's fewest updates
    first = _replies(client, fed, sent, contexts, sim["seed"], out.notes, want)
    if not first.replies:
        raise RuntimeError("no client of round 1 replied")
    out.clients = len(first.replies)
    out.up_raw = first.raw if server.strategy.communicates else 0.0
    out.up_first = server.strategy.traffic(first.replies)[0] / len(first.replies)
    if sim.get("async_buffer"):
        out.notes.append(
            "sim.async_buffer (FedBuff): a server step every K arrivals; later rounds are not "
            "simulated (round 1's sizes stand for them)"
        )
        return out
    try:
        _round_two(out, server, client, fed, first, contexts)
    except Exception as e:  # noqa: BLE001 - an odd combination: say so, do not guess
        out.notes.append(f"round 2 not simulated ({_short(e)}): round 1's sizes stand for it")
    if getattr(server.strategy, "folds_into_base", False):
        out.notes.append(
            f"strategy {server.strategy.name}: a later round's downlink adds the folded changes "
            "a client has not received yet, which grow with the rounds it missed (round 2's shown)"
        )
    return out


def setup_notes(server: Components) -> list[str]:
    """What the measured rounds leave out of a data-driven initialisation's set-up."""
    adapter, notes = server.adapter, []
    init = getattr(adapter, "data_init", None)
    if init is not None and getattr(init, "source", None) == "clients":
        notes.append(
            "adapter.init.source=clients: the set-up round before round 1 (the sampled "
            "clients send their statistics) is not included"
        )
    if getattr(init, "per_layer_ranks", False):
        notes.append(
            f"adapter.init.method={init.method}: sizes at rank r in every layer; the set-up "
            "redistributes the ranks across layers from data"
        )
    if server.strategy.client_ranks is not None:
        notes.append(
            "adapter.client_ranks: clients train ranks of their own; each size is the mean "
            "over the clients measured"
        )
    return notes


def _without_faults(uplink) -> bool:
    """Take the injected faults out of a chain (a crash would leave nothing to measure);
    whether there were any."""
    before = len(uplink.stages)
    uplink.stages = [s for s in uplink.stages if s.name != "faults"]
    return len(uplink.stages) < before


def _federation(server: Components, client):
    """The server's federation over the clients' model (its arrays at initialisation), as the
    run binds it; the frozen factors as they come from the adapter (a data-driven
    initialisation gives other values of the same shapes)."""
    from fedsim.records import array_record
    from fedsim.strategy import Federation, StrategyContext

    sim, model, spec = server.sim, client.model, client.spec
    uplink = server.uplink(spec)
    _without_faults(uplink)
    central = uplink.get("central_dp")
    if central is not None:
        central.dp.start(sim["num_clients"], sim["clients_per_round"], sim["rounds"])
    node_of = {i: i + 1 for i in range(sim["num_clients"])}
    ctx = StrategyContext(server.sampler(), node_of, spec, sim["seed"], aggregation_error=False)
    fed = Federation(server.strategy, uplink, ctx, server.server_opt)
    fed.frozen = spec.frozen_state(model)
    frozen = uplink.get("frozen")
    if frozen is not None:
        frozen.record(model)
    return fed, array_record(server.strategy.initial_arrays(model, spec))


def _context(fed, msg: Message, sim: dict) -> Context:
    config = {
        keys.PARTITION_ID: fed.client_of[msg.metadata.dst_node_id],
        keys.NUM_PARTITIONS: sim["num_clients"],
    }
    return Context(
        run_id=1,
        node_id=msg.metadata.dst_node_id,
        node_config=config,
        state=RecordDict(),
        run_config={},
    )


@dataclass
class Replies:
    messages: list[Message]  # the training messages replied to
    replies: list[Message]
    good: list[Message]  # those the server would aggregate
    raw: float  # float32 bytes of the arrays the strategy's client half sends, per client


def _replies(client, fed, sent, contexts: dict, seed: int, notes: list[str], want: int = CLIENTS):
    """Replies to the first ``want`` messages whose client replies (a failure is passed over),
    each after a random update of the trained parameters, screened as the server screens
    them (a compressed payload is decoded)."""
    from fedsim.engines.inline import transport_copy
    from fedsim.training import LocalResult

    out, raw, failed = Replies([], [], [], 0.0), 0, []
    steps = client.c.sim["local_steps"]
    for i, msg in enumerate(sent):
        if len(out.replies) == want:
            break
        msg.metadata.__dict__["_message_id"] = f"estimate-{msg.metadata.group_id}-{i}"
        try:
            job = client.begin_train(transport_copy(msg), contexts[msg.metadata.dst_node_id])
            _random_update(client.trained, seed + i)
            sending = client.c.strategy.sent_arrays(client.model, client.spec, job.call)
            reply = client.finish_train(job, LocalResult(loss=0.0, steps=steps), None, {})
        except Exception as e:  # noqa: BLE001 - an injected fault: the next client
            failed.append(_short(e))
            continue
        raw += sum(4 * t.numel() for t in sending.values())
        reply = transport_copy(reply)
        out.messages.append(msg)
        out.replies.append(reply)
        if fed.reply_reason(fed.client_of[msg.metadata.dst_node_id], reply) is None:
            out.good.append(reply)
    if failed:
        notes.append(f"{len(failed)} client(s) passed over: {failed[0]}")
    out.raw = raw / max(len(out.replies), 1)
    return out


@torch.no_grad()
def _random_update(params: list[torch.Tensor], seed: int) -> None:
    """A change of every trained value (1e-3 of its tensor's scale, Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        if p.requires_grad:
            scale = float(p.detach().float().abs().mean()) or 1.0
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * (1e-3 * scale)
            p.add_(noise.to(p.device, p.dtype))


def _round_two(out: Traffic, server, client, fed, first: Replies, contexts) -> None:
    """Aggregate round 1's replies, then send round 2 to the same clients: what a client
    receives and sends when it comes back. Arrays of its round-1 message that round 2 does
    not send are listed by name prefix (``frozen/*``)."""
    new, _ = fed.aggregate_train(1, first.good)
    if new is None:
        raise RuntimeError("round 1 aggregated nothing")
    config = ConfigRecord()
    info = fed.begin(2, new, config)
    clients = [fed.client_of[m.metadata.dst_node_id] for m in first.messages]
    again = fed.messages(info, clients, new, config)
    out.down_later = server.strategy.traffic(again)[0] / len(again)
    later = set(_names(again[0]))
    for name, size in _names(first.messages[0]).items():
        if name not in later:
            group = name.split("/", 1)[0] + "/*" if "/" in name else "other arrays"
            out.one_time[group] = out.one_time.get(group, 0) + size
    second = _replies(
        client, fed, again, contexts, server.sim["seed"] + 1000, out.notes, len(again)
    )
    if second.replies:
        out.up_later = server.strategy.traffic(second.replies)[0] / len(second.replies)


def _names(msg: Message) -> dict[str, int]:
    """Bytes of each array of a training message's arrays record."""
    from fedsim.records import payload

    record = msg.content[keys.ARRAYS]
    return {name: payload(RecordDict({keys.ARRAYS: _one(record, name)}))[0] for name in record}


def _one(record, name):
    from flwr.app import ArrayRecord

    single = ArrayRecord()
    single[name] = record[name]
    return single


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= 160 else text[:157] + "..."
