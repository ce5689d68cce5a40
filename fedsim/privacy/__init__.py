"""Differential privacy: sample-level DP-SGD on clients, through Opacus (Abadi et al., 2016,
"Deep Learning with Differential Privacy"), and user-level DP-FedAvg on the server (McMahan et
al., 2018, "Learning Differentially Private Recurrent Language Models"; :mod:`.central`).

``privacy=dpsgd``: every local step draws a Poisson batch (each of the client's ``n`` examples
with probability ``q = min(1, batch_size / n)``), clips each example's gradient to
``clip_norm`` and adds Gaussian noise of standard deviation ``noise_multiplier * clip_norm``
(Opacus' ``GradSampleModule`` and ``DPOptimizer``). Each client's accountant history
(``(sigma, q, steps)`` entries; Opacus' RDP or PRV accountant, ``privacy.accountant``) lives in
its ``Context.state``, so epsilon adds up over all the rounds it took part in; a new accountant
every round would under-report it. Central DP can adapt its clip norm to a quantile of the
update norms (Andrew et al., 2021; :mod:`.adaptive`).

``target_epsilon`` instead of ``noise_multiplier``: the noise is computed for the worst case, a
client sampled in every round and taking all its local steps (``sim.rounds * sim.local_steps``
steps at its own ``q``), so no client can exceed the target. ``delta`` defaults to
``1 / (10 n)`` for a client with ``n`` training examples (well below ``1/n``, as Opacus' FAQ
asks). Opacus' ``secure_mode`` needs torchcsprng, which does not work with torch 2.x: noise
comes from a seeded generator (reproducible, not cryptographically secure).
"""

from fedsim.privacy.accountant import Accountant
from fedsim.privacy.adaptive import AdaptiveClip
from fedsim.privacy.central import CentralDP, CentralNoise, clip_update
from fedsim.privacy.dpsgd import (
    DPSGD,
    GRAD_SAMPLE_MODES,
    ClientDP,
    NoPrivacy,
    Privacy,
    poisson_indices,
    train_local_dp,
    wrap,
)

__all__ = [
    "DPSGD",
    "GRAD_SAMPLE_MODES",
    "Accountant",
    "AdaptiveClip",
    "CentralDP",
    "CentralNoise",
    "ClientDP",
    "NoPrivacy",
    "Privacy",
    "clip_update",
    "poisson_indices",
    "train_local_dp",
    "wrap",
]
