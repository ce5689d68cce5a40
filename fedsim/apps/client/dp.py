"""A client's differential privacy: DP-SGD settings per round, its accountant across rounds.

Each client's accountant history lives in its ``Context.state`` (``fedsim.privacy``), so
epsilon adds up over every round it trains in and over LoRA-SB's set-up round.
"""

from __future__ import annotations

import torch
from flwr.app import RecordDict

from fedsim import keys
from fedsim.privacy import DPSGD, Accountant, ClientDP, wrap
from fedsim.records import array_record, numpy_dict


class ClientPrivacy:
    """DP-SGD for the clients of one process (``privacy=dpsgd``).

    Parameters
    ----------
    privacy : DPSGD
        The built config group.
    components
        The run's components (batch size, steps, the adapter's data-driven initialisation).
    model : torch.nn.Module
        The process's model (wrapped by Opacus for per-example gradients when first needed).
    device : torch.device or None
    """

    def __init__(self, privacy: DPSGD, components, model, device) -> None:
        self.privacy, self.c, self.model, self.device = privacy, components, model, device
        self._gsm = None
        self._gsm_trains: tuple[str, ...] = ()  # the parameters its hooks were put on

    def sigma(self, n: int) -> float:
        """A client's noise multiplier. For a target epsilon: the worst case, sampled in every
        round for every local step, and in the set-up round when the initialisation draws on
        clients."""
        c = self.c
        init = c.adapter.data_init
        steps = init.client_steps if init is not None else 0
        batch_size = c.strategy.client_batch_size(c.sim["batch_size"])
        return self.privacy.sigma_for(n, batch_size, c.total_local_steps, steps)

    @property
    def gsm(self):
        """The model wrapped by Opacus for per-example gradients (once per process: its hooks
        stay on the model; the batched engine computes per-example gradients itself). Opacus
        puts hooks on the modules whose parameters take gradients when it wraps: when a
        strategy freezes other parameters this round (RoLoRA's factors), the model is wrapped
        again for them, the old hooks removed."""
        trains = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
        if self._gsm is not None and trains != self._gsm_trains:
            remove = getattr(self._gsm, "remove_hooks", None)
            if remove is not None:
                remove()
            self._gsm = None
        if self._gsm is None:
            self._gsm = wrap(self.model, self.privacy)
            self._gsm_trains = trains
        return self._gsm

    def start(self, state: RecordDict, num_examples: int, batch_size: int, seed: int) -> ClientDP:
        """A client's DP-SGD settings for this round: its accountant (from its state), noise
        multiplier, Poisson rate and noise generator (``seed``: from its batch generator)."""
        q = self.privacy.sample_rate(num_examples, batch_size)
        return ClientDP(
            accountant=accountant_of(state, self.privacy.accountant),
            sigma=self.sigma(num_examples),
            sample_rate=q,
            expected_batch=max(1, int(round(q * num_examples))),
            # on the model's device: Opacus draws the noise there (a CPU generator cannot)
            noise=torch.Generator(device=self.device or "cpu").manual_seed(seed + 2),
            num_examples=num_examples,
        )

    def finish(self, dp: ClientDP, state: RecordDict) -> dict:
        """The client's accountant back into its state; the reply's privacy metrics."""
        keep_accountant(state, dp.accountant)
        delta = self.privacy.delta_for(dp.num_examples)
        return {
            keys.EPSILON: dp.accountant.epsilon(delta),
            keys.DELTA: delta,
            keys.NOISE_MULTIPLIER: dp.sigma,
        }

    def charge_setup(self, state: RecordDict, sigma: float, num_examples: int) -> dict:
        """One Gaussian mechanism at sample rate 1 (the set-up round's statistics) recorded
        by the client's accountant; the reply's epsilon and delta."""
        accountant = accountant_of(state, self.privacy.accountant)
        accountant.step(sigma, 1.0)
        keep_accountant(state, accountant)
        delta = self.privacy.delta_for(num_examples)
        return {keys.EPSILON: accountant.epsilon(delta), keys.DELTA: delta}


def accountant_of(state: RecordDict, kind: str = "rdp") -> Accountant:
    """The client's accountant (``kind``: ``privacy.accountant``), from its state (empty at
    first)."""
    if keys.STATE_PRIVACY not in state:
        return Accountant.from_array(None, kind)
    return Accountant.from_array(numpy_dict(state[keys.STATE_PRIVACY])["history"], kind)


def keep_accountant(state: RecordDict, accountant: Accountant) -> None:
    state[keys.STATE_PRIVACY] = array_record({"history": accountant.to_array()})
