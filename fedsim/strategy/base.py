"""The base class of fedsim's server strategies: an aggregation rule with its client half.

A strategy says what the round's clients receive and train, what they send back, and how the
server turns their updates into the new global arrays:

* the **server half** — :meth:`AdapterStrategy.aggregate` (most strategies override only this),
  and what a client receives beyond the global arrays (:meth:`~AdapterStrategy.downlink`);
* the **client half** — :meth:`~AdapterStrategy.client_receive` loads what the server sent
  into the client's model and :meth:`~AdapterStrategy.client_send` picks what goes back.

What happens to the messages on the way (compression with error feedback, EF21-P, central DP,
injected faults, the frozen factors of a data-driven initialisation) is the uplink chain's
(:mod:`fedsim.uplink`), and the Flower strategy that runs a round around both is
:class:`fedsim.strategy.rounds.Federation`. A new strategy usually overrides :meth:`aggregate`
only; see ``strategies/fedavg.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from torch import nn

from fedsim.adapters.base import Adapter, AdapterSpec
from fedsim.data import FederatedData
from fedsim.errors import ConfigError, RunFailed
from fedsim.messages import ClientCall, ClientUpdate, check_arrays, weighted_mean
from fedsim.records import messages_payload
from fedsim.strategy.sampling import ClientSampler
from fedsim.tasks.base import Batch
from fedsim.validate import boolean

log = logging.getLogger(__name__)


@dataclass
class StrategyContext:
    """What fedsim's server tells a strategy before the first round."""

    sampler: ClientSampler
    node_of: dict[int, int]  # partition id -> Flower node id
    spec: AdapterSpec  # parameter names trained / sent / frozen, the adapter
    seed: int
    aggregation_error: bool = True  # compute the per-round exactness diagnostic
    client_of: dict[int, int] = field(init=False)  # node id -> partition id

    def __post_init__(self) -> None:
        self.client_of = {node: client for client, node in self.node_of.items()}


class StrategyTraits:
    """What a strategy declares about itself (class attributes the config checks, the
    engines and the uplink chain read); :class:`AdapterStrategy` inherits them."""

    #: names of the adapters (``conf/adapter``) the strategy works with; ``None``: any
    adapters: tuple[str, ...] | None = None
    #: no global model: each client keeps its own (server-side evaluation and the
    #: aggregation error are null; clients evaluate their personal models)
    personalised = False
    #: the server step is a (weighted) mean of the arrays clients send, so error feedback's
    #: server step (EF21, EControl) and central DP's noised sum can replace it
    averages = False
    #: clients send updates (the references ``local`` and ``centralized`` do not)
    communicates = True
    #: clients train the same parameters every round (FLoRA starts fresh ones, RoLoRA
    #: alternates its factors)
    persistent_parameters = True
    #: the adapter a client trains carries over from round to round, so a data-driven
    #: initialisation (LoRA-GA, EVA) lasts (FLoRA starts fresh adapters every round, FlexLoRA
    #: re-factorises the global change)
    keeps_adapters = True
    #: how the refusals that need persistent parameters describe a strategy without them
    changing_parameters = "trains fresh parameters every round"
    #: changes are folded into the clients' frozen base weights (FedEx, FLoRA), so clients'
    #: base weights differ (the batched engine stacks them)
    folds_into_base = False
    #: clients may train ranks of their own (``adapter.client_ranks``: FLoRA, HetLoRA, FlexLoRA)
    heterogeneous_ranks = False
    #: what a client sends has the shapes of :meth:`reference` (a compressor's payload and
    #: EF21-P's catch-up rely on it; HetLoRA's clients prune their rank as they train)
    compressible = True


class AdapterStrategy(StrategyTraits):
    """Base class of fedsim strategies. Subclasses implement :meth:`aggregate`.

    Parameters
    ----------
    weighted : bool
        Weight clients by their number of training examples (``p_i = n_i / sum n_j``) when
        averaging; otherwise every sampled client counts ``1/k``.
    """

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = boolean("strategy.weighted", weighted)
        self.ctx: StrategyContext | None = None
        #: the global arrays of the round being run
        self.current: dict[str, np.ndarray] = {}
        #: the global arrays as the round's clients hold them (EF21-P: ``w``, else current)
        self.held: dict[str, np.ndarray] = {}
        #: the change folded into the frozen base in the current round (float64, by module)
        self.round_fold: dict[str, np.ndarray] = {}
        #: extra numbers the last aggregation reports (logged in that round's metrics line)
        self.round_metrics: dict[str, float] = {}
        #: the run's robust rule (``fedsim.robust``, config group ``robust``) that replaces
        #: :meth:`average`'s mean; None: the mean
        self.robust = None
        #: each client's rank, from ``adapter.client_ranks`` (set by the build); None: adapter.r
        self.client_ranks: list[int] | None = None
        self._averaged = False  # average() was called in this aggregation

    @property
    def name(self) -> str:
        """The class messages name (a plug-in's own class for a wrapped aggregator)."""
        return type(self).__name__

    # ------------------------------------------------------------------ wiring
    def bind(self, ctx: StrategyContext) -> None:
        """Called by fedsim's server once, before the first round."""
        self.ctx = ctx

    @property
    def context(self) -> StrategyContext:
        if self.ctx is None:
            raise RuntimeError(f"{type(self).__name__} is not bound: call bind() first")
        return self.ctx

    def check_setup(self, adapter: Adapter, sim: Mapping[str, Any]) -> None:
        """Refuse, with a ConfigError, an adapter or settings the strategy cannot work with."""
        if self.adapters is not None and adapter.name not in self.adapters:
            needs = " or ".join(self.adapters)
            raise ConfigError(
                "adapter",
                adapter.name,
                f"strategy {self.name} needs adapter={needs}",
            )

    def global_names(self, spec: AdapterSpec) -> list[str]:
        """The parameters that make up the global arrays (default: everything the adapter sends)."""
        return list(spec.sent)

    def personal_names(self, spec: AdapterSpec) -> list[str]:
        """Trained parameters that never leave the client (default: none; FedSA's ``B``)."""
        return []

    def round_trained(self, spec: AdapterSpec, server_round: int) -> list[str]:
        """The parameters clients train in ``server_round`` (default: all the adapter trains;
        RoLoRA: one factor). The others keep the values the client received: no gradient,
        no optimizer step, no weight decay, no DP-SGD clipping or noise."""
        return list(spec.trained)

    # ------------------------------------------------------------------ client half
    def client_receive(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray], call: ClientCall
    ) -> None:
        """Load what the server sent into the client's model (default: load every array; the
        chain has already put the data-derived frozen factors among them)."""
        spec.load(model, arrays)

    def client_send(self, model: nn.Module, spec: AdapterSpec, call: ClientCall) -> dict:
        """What the client sends back after training (default: :meth:`sent_arrays`)."""
        return self.sent_arrays(model, spec, call)

    def sent_arrays(self, model: nn.Module, spec: AdapterSpec, call: ClientCall) -> dict:
        """The arrays a client sends, read from its model without side effects (default: the
        adapter's sent parameters). Read before training too: a compressed update is the
        difference between the two readings."""
        return spec.sent_state(model)

    def client_evaluate(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray], call: ClientCall
    ) -> None:
        """Prepare the client's model to evaluate the global model (default: load the arrays).

        Federated evaluation measures the global model on each client's local test split; it
        is not part of the training protocol and its traffic is not counted, so this hook must
        not change ``call.state`` (a personalised strategy may read it).
        """
        spec.load(model, arrays)

    def local_penalty(self, spec: AdapterSpec, call: ClientCall):
        """A regulariser of the local steps (HetLoRA's): ``penalty(names, tensors)`` adds its
        gradient to each trained tensor's ``grad``, after DP-SGD's noise; None (default)."""
        return None

    def client_data(self, data: FederatedData, client: int) -> Batch:
        """The examples a client trains on (default: its own training split)."""
        return data.client(client).train

    def client_batch_size(self, batch_size: int) -> int:
        """The batch size a client trains with (default: ``sim.batch_size``)."""
        return batch_size

    # ------------------------------------------------------------------ server half
    def initial_arrays(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        """The global arrays before round 1: the :meth:`global_names` parameters at
        initialisation (after a data-driven initialisation, if the adapter has one)."""
        params = spec.parameters_of(model)
        return {n: params[n].detach().cpu().numpy().copy() for n in self.global_names(spec)}

    def load_global(
        self, model: nn.Module, spec: AdapterSpec, arrays: dict[str, np.ndarray]
    ) -> None:
        """Make the server's model the global model (for server-side evaluation)."""
        spec.load(model, arrays)

    def train_clients(self, server_round: int) -> list[int]:
        """The clients (partition ids) that train in ``server_round`` (default: the sampler's;
        a stage of the chain may decide instead: central DP's Poisson sampling)."""
        return self.context.sampler.train_clients(server_round)

    def downlink(self, server_round: int, client: int, arrays: ArrayRecord) -> ArrayRecord:
        """What ``client`` receives in a training round (default: the global arrays)."""
        return arrays

    def evaluate_downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        """What a client receives to evaluate the global model (not counted as traffic)."""
        return arrays

    def acknowledge(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """Note what the clients that replied now hold (called after each aggregation, and
        for the replies of a skipped round)."""

    def traffic(self, messages: Iterable[Message]) -> tuple[int, int]:
        """(bytes, values) of the messages' payloads (docs/results.md, "What bytes count")."""
        return messages_payload(messages)

    def aggregate(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """The new global arrays from the current ones and the round's client updates.

        May return float64 arrays: the aggregation error is measured on what is returned, and
        fedsim then casts each array to the global array's dtype.
        """
        raise NotImplementedError

    def reference(self, client: int, server_round: int) -> dict[str, np.ndarray]:
        """What ``client`` started this round's training from, as the server knows it: the
        arrays its compressed update is relative to (default: the global arrays as clients
        hold them, :attr:`held`: EF21-P's ``w`` when the downlink is compressed)."""
        return self.held

    def check_reply(self, client: int, arrays: ArrayRecord) -> str | None:
        """Why a client's reply cannot be aggregated, or None if it can.

        Called by the server on every reply before :meth:`aggregate` (unless a stage of the
        chain owns the payload's format: compression decodes it instead); rejected replies
        count as failed clients. Default: the same names and shapes as the global arrays,
        finite values. A strategy whose clients send something else (a subset) overrides this
        together with :meth:`client_send` and :meth:`aggregate`.
        """
        return check_arrays(arrays, {n: v.shape for n, v in self.current.items()})

    def check_reply_at_rank(self, arrays: ArrayRecord, r: int) -> str | None:
        """:meth:`check_reply` for a LoRA client training rank ``r`` (``adapter.client_ranks``):
        the heads as the global arrays', each layer's ``lora_A`` ``r x n`` and ``lora_B``
        ``m x r``, finite values."""
        spec = self.context.spec
        shapes = {h: self.current[h].shape for h in spec.heads}
        for module, (m, n) in spec.shapes.items():
            shapes[spec.factors[module]["lora_A.weight"]] = (r, n)
            shapes[spec.factors[module]["lora_B.weight"]] = (m, r)
        return check_arrays(arrays, shapes)

    def average(self, updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
        """The mean of the arrays clients sent with weights :meth:`weights` (float64), or the
        run's robust rule in its place (``robust=median``...: docs/strategies.md). An averaging
        strategy (``averages = True``) computes its mean here."""
        arrays, p = [u.arrays for u in updates], self.weights(updates)
        self._averaged = True
        if self.robust is None or not self.robust.active:
            return weighted_mean(arrays, p)
        return self.robust.aggregate(arrays, p)

    def aggregate_round(
        self, server_round: int, current: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> dict[str, np.ndarray]:
        """:meth:`aggregate`, as the server calls it: with a robust rule, the strategy must
        have computed its mean through :meth:`average` (else the rule would be ignored)."""
        self._averaged = False
        new = self.aggregate(server_round, current, updates)
        if self.robust is not None and self.robust.active and not self._averaged:
            raise RunFailed(
                f"round {server_round}: {self.name}.aggregate did not call average(), so "
                f"robust={self.robust.name} would be ignored (docs/strategies.md)"
            )
        return new

    def rank(self, client: int, spec: AdapterSpec) -> int:
        """The rank ``client`` trains (``adapter.client_ranks``, else ``adapter.r``)."""
        return spec.adapter.r if self.client_ranks is None else self.client_ranks[client]

    def diagnostic_ideal(self, spec, frozen, current, updates) -> dict[str, np.ndarray] | None:
        """The ideal change ``dW*`` by layer and head (float64) for the exactness diagnostic,
        where clients start from something else than ``current`` (HetLoRA, FlexLoRA); None
        (default): the :meth:`weights`-weighted mean of their changes from ``current``."""
        return None

    def min_updates(self) -> int:
        """The fewest good replies the aggregation can use (a robust rule may need more than
        one: Krum ``2f + 3``); a round with fewer is skipped."""
        return 1 if self.robust is None else self.robust.min_updates()

    def weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """``p_i``: by number of examples if ``weighted``, else uniform."""
        if self.weighted:
            n = np.array([u.num_examples for u in updates], dtype=np.float64)
            return n / n.sum()
        return np.full(len(updates), 1.0 / len(updates))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The strategy's own server state that must survive a round beyond the global
        arrays, as a state tree (nested dicts and lists of numbers, strings and numpy arrays;
        see :mod:`fedsim.checkpoint`). Checkpoints save it and :meth:`load_state_dict`
        restores it. A strategy with state extends the dict (``{**super().state_dict(),
        "mine": ...}``) and reads its part back in its own :meth:`load_state_dict` before
        calling ``super()``; what the server rebuilds each round (``current``) is not state.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def summary(self) -> None:
        log.info("%s(weighted=%s)", self.name, self.weighted)
        if self.robust is not None and self.robust.active:
            log.info("robust aggregation: %s on the sent arrays", self.robust.describe())
