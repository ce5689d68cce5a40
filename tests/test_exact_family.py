"""One battery over every strategy: fake client replies through Flower's message path, checked
against the direct numpy equations of ``tests/reference_numpy.py`` (docs/reference.md, 1-3):
the new global state, the aggregation error, and the bytes of every message, for sampled and
returning clients; then the client halves (catch-up, one-time broadcast, personal state)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

import tests.reference_numpy as ref
from fedsim import keys
from fedsim.adapters import FFALoRA, LoRA, LoRASB
from fedsim.init import FrozenFactors
from fedsim.records import array_record, numpy_dict, payload
from fedsim.strategy import ClientCall, ClientSampler, StrategyContext
from fedsim.strategy import Federation as Rounds
from fedsim.uplink import Uplink
from strategies.centralized import Centralized
from strategies.fedavg import FedAvg
from strategies.fedex import FedEx
from strategies.fedsa import FedSA
from strategies.fedsb import FedSB
from strategies.ffa import FFA
from strategies.flora import FLoRA
from strategies.local import Local

LAYERS = {"fc1": (16, 12), "fc2": (20, 16)}  # module -> (m, n) of its base weight
HEAD = 3 * 20 + 3  # classifier weight and bias
R, ALPHA = 2, 4.0
N, K, ROUNDS = 5, 3, 4


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2, self.classifier = nn.Linear(12, 16), nn.Linear(16, 20), nn.Linear(20, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def adapted(adapter):
    model = Tiny()
    spec = adapter.apply(
        model, default_targets=("fc1", "fc2"), head_modules=("classifier",), seed=0
    )
    return model, spec


@pytest.fixture(autouse=True)
def _as_a_server_app():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


# ----------------------------------------------------------------------------- the harness


def chain(spec) -> Uplink:
    """The chain of these runs: the frozen factors of LoRA-SB's data-driven init, if any."""
    return Uplink([FrozenFactors(spec)] if FrozenFactors.needed(spec) else [])


class Federation:
    """A strategy bound to a tiny model, fed fake replies round after round."""

    def __init__(self, strategy, adapter, *, num_clients=N, k=K, data_init=False) -> None:
        self.strategy, self.adapter = strategy, adapter
        self.model, self.spec = adapted(adapter)
        if data_init:  # LoRA-SB's init from a gradient (any G will do here)
            rng = np.random.default_rng(1)
            grads = {m: rng.normal(size=shape) for m, shape in LAYERS.items()}
            adapter.initialize(self.model, self.spec, grads, eta1=0.01)
        self.node_of = {c: 100 + c for c in range(num_clients)}
        ctx = StrategyContext(ClientSampler(num_clients, k, 0), self.node_of, self.spec, 0)
        self.rounds_of = Rounds(strategy, chain(self.spec), ctx)  # what the server runs
        self.arrays = array_record(strategy.initial_arrays(self.model, self.spec))
        self.frozen = self.rounds_of.frozen = self.spec.frozen_state(self.model)
        if "frozen" in self.rounds_of.uplink.names:
            self.rounds_of.uplink["frozen"].record(self.model)
        self.rng = np.random.default_rng(7)
        self.history: list[list[int]] = []  # sampled clients per round
        self.rounds: list[dict] = []

    def reply_arrays(self, client: int, current: dict) -> dict[str, np.ndarray]:
        """What a client "trained": the global arrays plus noise (FLoRA: fresh factors)."""
        out = {}
        for name, value in current.items():
            out[name] = (value + 0.1 * self.rng.normal(size=value.shape)).astype(np.float32)
        if isinstance(self.strategy, FLoRA):
            r = self.strategy.rank(client, self.spec)
            for module, (m, n) in LAYERS.items():
                f = self.spec.factors[module]
                out[f["lora_A.weight"]] = self.rng.normal(size=(r, n)).astype(np.float32)
                out[f["lora_B.weight"]] = self.rng.normal(size=(m, r)).astype(np.float32)
        return out

    def play(self, server_round: int) -> dict:
        s = self.rounds_of
        old = numpy_dict(self.arrays)
        msgs = list(s.configure_train(server_round, self.arrays, ConfigRecord(), None))
        for i, m in enumerate(msgs):
            m.metadata.__dict__["_message_id"] = f"r{server_round}m{i}"
        clients = [s.client_of[m.metadata.dst_node_id] for m in msgs]
        sent = {c: self.reply_arrays(c, old) for c in clients}
        examples = {c: 10 + 7 * c for c in clients}
        replies = []
        for c, m in zip(clients, msgs):
            content = RecordDict(
                {
                    keys.ARRAYS: array_record(sent[c]),
                    keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: examples[c]}),
                }
            )
            replies.append(Message(content, reply_to=m))
            assert self.strategy.check_reply(c, content[keys.ARRAYS]) is None
        new, _ = s.aggregate_train(server_round, replies)
        self.arrays = new
        self.history.append(clients)
        record = {
            "clients": clients,
            "old": old,
            "new": numpy_dict(new),
            "sent": sent,
            "examples": examples,
            "down": {c: payload(m.content)[0] for c, m in zip(clients, msgs)},
            "up": {c: payload(r.content)[0] for c, r in zip(clients, replies)},
            "messages": dict(zip(clients, msgs)),
            "error": s.last_aggregation_error,
        }
        self.rounds.append(record)
        return record

    def p(self, record: dict, weighted: bool) -> np.ndarray:
        if not weighted:
            return np.full(len(record["clients"]), 1.0 / len(record["clients"]))
        n = np.array([record["examples"][c] for c in record["clients"]], dtype=float)
        return n / n.sum()


def factor(spec, module: str, suffix: str) -> str:
    return spec.factors[module][suffix]


def heads_mean(spec, record, p):
    return {
        h: sum(w * record["sent"][c][h] for w, c in zip(p, record["clients"])) for h in spec.heads
    }


def check_heads(spec, record, p):
    for h, want in heads_mean(spec, record, p).items():
        np.testing.assert_allclose(record["new"][h], want, rtol=1e-5, atol=1e-6)


def lora_layers(spec, arrays, frozen=None):
    arrays = {**(frozen or {}), **arrays}
    return {
        m: ref.lora_delta(
            arrays[factor(spec, m, "lora_B.weight")],
            arrays[factor(spec, m, "lora_A.weight")],
            ALPHA,
        )
        for m in LAYERS
    }


def reference_error(spec, record, p, layer_fn, fold=None):
    """docs/reference.md, 3.2, from the numpy equations: layers and head parameters."""
    clients = record["clients"]
    old = layer_fn(record["old"])
    new = layer_fn({k: v.astype(np.float64) for k, v in record["exact_new"].items()})
    agg = {m: new[m] - old[m] + (fold[m] if fold else 0.0) for m in LAYERS}
    star = {
        m: ref.ideal_update([layer_fn(record["sent"][c])[m] for c in clients], old[m], p)
        for m in LAYERS
    }
    for h in spec.heads:
        agg[h] = record["exact_new"][h] - record["old"][h]
        star[h] = ref.ideal_update([record["sent"][c][h] for c in clients], record["old"][h], p)
    return ref.aggregation_error(agg, star)


# ----------------------------------------------------------------------------- server halves


def test_fedavg_is_fedit_and_not_exact():
    fed = Federation(FedAvg(), LoRA(r=R, alpha=ALPHA))
    spec = fed.spec
    for t in range(1, ROUNDS + 1):
        rec = fed.play(t)
        p = fed.p(rec, True)
        for m in LAYERS:
            names = [factor(spec, m, s) for s in ("lora_B.weight", "lora_A.weight")]
            b, a = ref.fedit(
                [rec["sent"][c][names[0]] for c in rec["clients"]],
                [rec["sent"][c][names[1]] for c in rec["clients"]],
                p,
            )
            np.testing.assert_allclose(rec["new"][names[0]], b, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(rec["new"][names[1]], a, rtol=1e-6, atol=1e-7)
        check_heads(spec, rec, p)
        exact_new = {
            k: sum(w * rec["sent"][c][k].astype(np.float64) for w, c in zip(p, rec["clients"]))
            for k in rec["new"]
        }
        rec["exact_new"] = exact_new
        want = reference_error(spec, rec, p, lambda arr: lora_layers(spec, arr))
        assert rec["error"] == pytest.approx(want, rel=1e-9)
        assert rec["error"] > 1e-3  # mean(B) mean(A) != mean(B A)
        for c in rec["clients"]:
            both = ref.bytes_fedit(list(LAYERS.values()), R, HEAD)
            assert (rec["up"][c], rec["down"][c]) == (both, both)


@pytest.mark.parametrize("weighted", [False, True])
def test_fedsb_averages_r_exactly_and_sends_b_a_once(weighted):
    fed = Federation(FedSB(weighted=weighted), LoRASB(r=R), data_init=True)
    spec = fed.spec
    frozen = fed.frozen
    seen: set[int] = set()
    for t in range(1, ROUNDS + 1):
        rec = fed.play(t)
        p = fed.p(rec, weighted)
        for m in LAYERS:
            name = factor(spec, m, "lora_R.weight")
            want = ref.fedsb([rec["sent"][c][name] for c in rec["clients"]], p)
            np.testing.assert_allclose(rec["new"][name], want, rtol=1e-6, atol=1e-7)
        check_heads(spec, rec, p)
        assert rec["error"] <= 1e-9
        for c in rec["clients"]:
            assert rec["up"][c] == ref.bytes_fedsb_up(list(LAYERS.values()), R, HEAD)
            first = c not in seen
            want = ref.bytes_fedsb_down(list(LAYERS.values()), R, HEAD, first, data_derived=True)
            assert rec["down"][c] == want, (t, c, first)
        seen.update(rec["clients"])
    # The B, A broadcast is the server's data-derived factors.
    some = next(iter(fed.rounds[0]["messages"].values()))
    got = numpy_dict(some.content[keys.ARRAYS])
    for name, value in frozen.items():
        np.testing.assert_array_equal(got["frozen/" + name], value)


def test_fedsb_with_seed_derived_factors_sends_no_b_a():
    fed = Federation(FedSB(), LoRASB(r=R, init={"method": "random"}))
    rec = fed.play(1)
    for c in rec["clients"]:
        want = ref.bytes_fedsb_down(list(LAYERS.values()), R, HEAD, True, data_derived=False)
        assert rec["down"][c] == want


def test_ffa_averages_b_exactly():
    fed = Federation(FFA(), FFALoRA(r=R, alpha=ALPHA))
    spec = fed.spec
    for t in range(1, ROUNDS + 1):
        rec = fed.play(t)
        p = fed.p(rec, True)
        for m in LAYERS:
            name = factor(spec, m, "lora_B.weight")
            want = sum(
                w * rec["sent"][c][name].astype(np.float64) for w, c in zip(p, rec["clients"])
            )
            np.testing.assert_allclose(rec["new"][name], want, rtol=1e-6, atol=1e-7)
        assert rec["error"] <= 1e-9
        for c in rec["clients"]:
            both = ref.bytes_ffa(list(LAYERS.values()), R, HEAD)
            assert (rec["up"][c], rec["down"][c]) == (both, both)


def test_fedsa_averages_a_keeps_b_and_has_no_error():
    fed = Federation(FedSA(), LoRA(r=R, alpha=ALPHA))
    spec = fed.spec
    assert not any(n.endswith("lora_B.weight") for n in numpy_dict(fed.arrays))
    for t in range(1, 3):
        rec = fed.play(t)
        p = fed.p(rec, True)
        for m in LAYERS:
            name = factor(spec, m, "lora_A.weight")
            want = sum(
                w * rec["sent"][c][name].astype(np.float64) for w, c in zip(p, rec["clients"])
            )
            np.testing.assert_allclose(rec["new"][name], want, rtol=1e-6, atol=1e-7)
        assert rec["error"] is None
        for c in rec["clients"]:
            both = ref.bytes_fedsa(list(LAYERS.values()), R, HEAD)
            assert (rec["up"][c], rec["down"][c]) == (both, both)


def test_fedex_folds_the_exact_residual_and_counts_catch_up():
    fed = Federation(FedEx(), LoRA(r=R, alpha=ALPHA))
    spec, s = fed.spec, fed.strategy
    base = {m: np.zeros(shape) for m, shape in LAYERS.items()}
    for t in range(1, ROUNDS + 1):
        rec = fed.play(t)
        p = fed.p(rec, True)
        clients = rec["clients"]
        for m in LAYERS:
            bn, an = factor(spec, m, "lora_B.weight"), factor(spec, m, "lora_A.weight")
            bs = [rec["sent"][c][bn] for c in clients]
            as_ = [rec["sent"][c][an] for c in clients]
            b, a = ref.fedit(bs, as_, p)
            np.testing.assert_allclose(rec["new"][bn], b, rtol=1e-6, atol=1e-7)
            # the residual against the means as sent (float32), docs/reference.md 2.4
            base[m] += ref.fedex_residual(bs, as_, p, ALPHA, rec["new"][bn], rec["new"][an])
            np.testing.assert_allclose(s.base_delta[m], base[m], rtol=1e-12, atol=1e-12)
            # exactness of the global effective weight
            target = sum(w * ref.lora_delta(bb, aa, ALPHA) for w, bb, aa in zip(p, bs, as_))
            got = base[m] + ref.lora_delta(rec["new"][bn], rec["new"][an], ALPHA)
            prev = base[m] - ref.fedex_residual(bs, as_, p, ALPHA, rec["new"][bn], rec["new"][an])
            np.testing.assert_allclose(got - prev, target, rtol=1e-10, atol=1e-12)
        assert rec["error"] <= 1e-9
    missed = ref.simulate_catch_up(fed.history, N)
    ks = [len(c) for c in fed.history]
    for t, rec in enumerate(fed.rounds):
        for c in rec["clients"]:
            want = ref.bytes_fedex_down(
                list(LAYERS.values()), R, HEAD, [ks[u - 1] for u in missed[t][c]]
            )
            assert rec["down"][c] == want, (t + 1, c, missed[t][c])
            assert rec["up"][c] == ref.bytes_fedex_up(list(LAYERS.values()), R, HEAD)


@pytest.mark.parametrize("ranks", [None, [2, 1, 2, 1, 1]])
def test_flora_stacks_exactly_with_per_client_ranks(ranks):
    flora = FLoRA()
    flora.client_ranks = ranks  # what the build sets from adapter.client_ranks
    fed = Federation(flora, LoRA(r=R, alpha=ALPHA, client_ranks=ranks))
    spec, s = fed.spec, fed.strategy
    base = {m: np.zeros(shape) for m, shape in LAYERS.items()}
    stacked = []
    for t in range(1, ROUNDS + 1):
        rec = fed.play(t)
        p = fed.p(rec, True)
        clients = rec["clients"]
        for m in LAYERS:
            bn, an = factor(spec, m, "lora_B.weight"), factor(spec, m, "lora_A.weight")
            bs = [rec["sent"][c][bn] for c in clients]
            as_ = [rec["sent"][c][an] for c in clients]
            base[m] += ref.flora_merge(bs, as_, p, ALPHA)
            np.testing.assert_allclose(s.base_delta[m], base[m], rtol=1e-12, atol=1e-12)
        check_heads(spec, rec, p)
        assert rec["error"] <= 1e-9
        ranks_t = [s.rank(c, spec) for c in clients]
        stacked.append(sum(ranks_t))
        for c, r_i in zip(clients, ranks_t):
            assert rec["up"][c] == ref.bytes_flora_up(list(LAYERS.values()), r_i, HEAD)
    missed = ref.simulate_catch_up(fed.history, N)
    for t, rec in enumerate(fed.rounds):
        for c in rec["clients"]:
            want = ref.bytes_flora_down(
                list(LAYERS.values()), HEAD, [stacked[u - 1] for u in missed[t][c]]
            )
            assert rec["down"][c] == want, (t + 1, c)


def test_local_sends_nothing_and_centralized_trains_one_model():
    fed = Federation(Local(), LoRA(r=R, alpha=ALPHA))
    rec = fed.play(1)
    assert set(rec["down"].values()) == {0} and set(rec["up"].values()) == {0}
    assert rec["error"] is None
    fed = Federation(Centralized(batch_multiplier=3), LoRA(r=R, alpha=ALPHA))
    rec = fed.play(1)
    assert rec["clients"] == [0]
    assert fed.strategy.traffic(rec["messages"].values()) == (0, 0)
    for k, v in rec["new"].items():
        np.testing.assert_array_equal(v, rec["sent"][0][k])
    assert rec["error"] == 0.0
    assert fed.strategy.client_batch_size(16) == 48


# ----------------------------------------------------------------------------- client halves


def run_clients(fed, check):
    """Every sampled client receives its message in one shared "process" model, keeping its own
    Context.state across rounds; ``check(client, model, spec, round)`` runs after each receive."""
    client_strategy = type(fed.strategy)(**getattr(fed, "kwargs", {}))
    model, spec = adapted(fed.adapter)
    client_chain = chain(spec)
    states: dict[int, RecordDict] = {}
    for t, rec in enumerate(fed.rounds, start=1):
        for c in rec["clients"]:
            state = states.setdefault(c, RecordDict())
            call = ClientCall(client=c, server_round=t, seed=0, state=state)
            arrays = numpy_dict(rec["messages"][c].content[keys.ARRAYS])
            arrays = client_chain.receive(call, arrays)
            client_strategy.client_receive(model, spec, arrays, call)
            check(c, model, spec, t)
    return states


@pytest.mark.parametrize("cls", [FedEx, FLoRA])
def test_clients_catch_up_to_the_servers_base(cls):
    fed = Federation(cls(), LoRA(r=R, alpha=ALPHA))
    pristine = {
        m: getattr(fed.model, m).base.weight.detach().double().numpy().copy() for m in LAYERS
    }
    bases = []  # the server's folded change before each round
    for t in range(1, ROUNDS + 1):
        bases.append({m: v.copy() for m, v in fed.strategy.base_delta.items()})
        fed.play(t)

    def check(client, model, spec, t):
        for m in LAYERS:
            got = getattr(model, m).base.weight.detach().double().numpy()
            want = pristine[m] + bases[t - 1].get(m, 0.0)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    run_clients(fed, check)


def test_fedsb_clients_keep_the_broadcast_b_a():
    fed = Federation(FedSB(), LoRASB(r=R), data_init=True)
    for t in range(1, ROUNDS + 1):
        fed.play(t)
    frozen = fed.frozen

    def check(client, model, spec, t):
        params = spec.parameters_of(model)
        for name, value in frozen.items():
            np.testing.assert_array_equal(params[name].detach().numpy(), value)
        with torch.no_grad():  # scramble: the next receive must restore them from the state
            for name in frozen:
                params[name].add_(1.0)

    states = run_clients(fed, check)
    assert all(keys.STATE_FROZEN in st for st in states.values())


def test_personal_parameters_stay_with_their_client():
    strategy = FedSA()
    model, spec = adapted(LoRA(r=R, alpha=ALPHA))
    personal = strategy.personal_names(spec)
    params = spec.parameters_of(model)
    states = {0: RecordDict(), 1: RecordDict()}
    glob = {n: params[n].detach().numpy().copy() for n in strategy.global_names(spec)}
    kept = {}
    for c in (0, 1):
        call = ClientCall(c, 1, 0, states[c])
        strategy.client_receive(model, spec, glob, call)
        for n in personal:
            assert not params[n].detach().any()  # B starts at zero
        with torch.no_grad():
            for n in personal:
                params[n].fill_(float(c + 1))  # "training"
        sent = strategy.client_send(model, spec, call)
        assert set(sent) == set(glob)  # B never leaves the client
        kept[c] = float(c + 1)
    for c in (1, 0):
        strategy.client_receive(model, spec, glob, ClientCall(c, 2, 0, states[c]))
        for n in personal:
            assert torch.all(params[n] == kept[c])


# ----------------------------------------------------------------------------- LoRA-SB


def test_lora_sb_init_product_is_the_rank_r_truncation_of_the_sign_step():
    adapter = LoRASB(r=R)
    model, spec = adapted(adapter)
    rng = np.random.default_rng(3)
    grads = {m: rng.normal(size=shape) for m, shape in LAYERS.items()}
    adapter.initialize(model, spec, grads, eta1=0.003)
    for m in LAYERS:
        got = getattr(model, m).delta_weight().detach().double().numpy()
        want = ref.lora_sb_init_product(grads[m], 0.003, R)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert np.linalg.matrix_rank(got, tol=1e-5 * np.linalg.norm(got, 2)) == R


def test_lora_sb_base_gradients_equal_plain_autograd():
    from fedsim.adapters.gradients import base_gradients

    adapter = LoRASB(r=R, init={"batch_size": 8})
    model, spec = adapted(adapter)
    g = torch.Generator().manual_seed(5)
    data = {"x": torch.randn(20, 12, generator=g), "label": torch.randint(0, 3, (20,), generator=g)}
    got = base_gradients(
        model, spec, lambda mdl, b: nn.functional.cross_entropy(mdl(b["x"]), b["label"]), data, 8
    )
    plain = Tiny()  # the same weights, no adapter at all
    want = {m: torch.zeros(shape, dtype=torch.float64) for m, shape in LAYERS.items()}
    for start in range(0, 20, 8):
        x, y = data["x"][start : start + 8], data["label"][start : start + 8]
        loss = nn.functional.cross_entropy(plain(x), y)
        grads = torch.autograd.grad(loss, [getattr(plain, m).weight for m in LAYERS])
        for m, gr in zip(LAYERS, grads):
            want[m] += gr.double()
    for m in LAYERS:
        np.testing.assert_allclose(got[m], want[m].numpy(), rtol=1e-5, atol=1e-7)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == spec.trained


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_opacus_per_sample_gradients_of_r_in_every_mode(mode):
    from opacus.grad_sample.utils import prepare_module

    adapter = LoRASB(r=R, init={"method": "random"})
    model, spec = adapted(adapter)
    with torch.no_grad():
        for m in LAYERS:
            getattr(model, m).lora_R.weight.normal_()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(6, 12, generator=g), torch.randint(0, 3, (6,), generator=g)
    plain = copy.deepcopy(model)  # the per-example reference, without Opacus' hooks
    gsm = prepare_module(model, mode, batch_first=True, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    params, ref_params = dict(model.named_parameters()), dict(plain.named_parameters())
    for m in LAYERS:
        name = f"{m}.lora_R.weight"
        per_sample = params[name].grad_sample
        assert per_sample.shape == (6, R, R)
        for i in range(6):
            loss = nn.functional.cross_entropy(plain(x[i : i + 1]), y[i : i + 1], reduction="sum")
            (want,) = torch.autograd.grad(loss, [ref_params[name]])
            torch.testing.assert_close(per_sample[i], want, rtol=1e-4, atol=1e-6)
    for name in spec.frozen:
        assert getattr(params[name], "grad_sample", None) is None


def test_local_clients_start_from_a_data_initialised_adapter():
    """LoRA-SB's R = S_r comes from the server's data: each local client gets it once."""
    fed = Federation(Local(), LoRASB(r=R), data_init=True)
    rec = fed.play(1)
    per_layer = sum(R * (m + n) + R * R for m, n in LAYERS.values())  # B, A and initial R
    for c in rec["clients"]:
        assert rec["down"][c] == 4 * (per_layer + HEAD) and rec["up"][c] == 0
    client = Local()
    model, spec = adapted(LoRASB(r=R))
    arrays = numpy_dict(rec["messages"][rec["clients"][0]].content[keys.ARRAYS])
    call = ClientCall(rec["clients"][0], 1, 0, RecordDict())
    client.client_receive(model, spec, chain(spec).receive(call, arrays), call)
    mine, server = spec.parameters_of(model), fed.spec.parameters_of(fed.model)
    for name in spec.trained + spec.frozen:  # R = S_r, B and A as the server initialised them
        torch.testing.assert_close(mine[name], server[name])
    later = fed.play(2)  # returning clients get nothing; first-timers get the adapter
    for c in later["clients"]:
        assert later["down"][c] == (0 if c in rec["clients"] else 4 * (per_layer + HEAD))
