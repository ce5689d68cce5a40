"""Byzantine clients (``faults=byzantine``): a fixed set of malicious clients that send
well-formed but hostile updates, which only the aggregator (``robust``) can resist.

The set is ``floor(byzantine_fraction * N)`` clients of the ``N`` (``sim.num_clients``), drawn
once from ``sim.seed`` (its own generator stream): the same clients attack in every round, on
every engine and in a resumed run. Whenever one of them is sampled it attacks; the others are
honest. With ``r`` the arrays the attacker started from (what it received; EF21-P's ``w``) and
``x`` what it trained, its update is ``d = x - r`` and it sends ``r + d'``:

* ``sign_flip``: ``d' = -d`` (the sign-flipping attack of Li et al., 2019, RSA);
* ``scaled``: ``d' = boost * d`` (explicit boosting, Bhagoji et al., 2019, with ``boost``
  the number of agents they boost by: 10);
* ``gaussian``: ``d' ~ N(0, noise_std^2 I)``, drawn from the attacker's generator seeded by
  ``(sim.seed, round, client)`` (the Gaussian Byzantine workers of Blanchard et al., 2017,
  standard deviation 200);
* ``alie`` ("A little is enough", Baruch et al., 2019): every attacker in the round sends
  ``mu - z sigma``, ``mu`` and ``sigma`` the coordinatewise mean and standard deviation (over
  clients, ``ddof=0``) of the round's benign replies, and ``z = Phi^-1((n - s) / n)`` with
  ``s = floor(n/2 + 1) - f`` (at least 1), ``n`` the replies and ``f`` the attackers among them
  (``alie_z`` fixes ``z`` instead). The attacker is omniscient, as in the paper: the server's
  half of this stage replaces the attackers' replies as they arrive, before the aggregation,
  with the same shapes and bytes; a round without benign replies uses the attackers' own;
* ``label_flip``: the attacker trains honestly on its own data with every label ``y`` replaced
  by ``C - 1 - y`` (``C`` classes: a classification task), and sends what it trained (label
  flipping, as in Fang et al., 2020).

The attacked update is computed before the chain's later stages (compression encodes it,
central DP clips it), so what travels is a well-formed payload: it passes the server's
screening (finite values, the right names and shapes). ``metrics.jsonl`` records each round's
attack and the attackers sampled; ``summary.json`` the set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from fedsim.errors import ConfigError
from fedsim.uplink import Stage
from fedsim.validate import number

ATTACKS = ("sign_flip", "scaled", "gaussian", "alie", "label_flip")
#: attacks a client computes on its own update (the others: on its data, or on the server)
ON_UPDATE = ("sign_flip", "scaled", "gaussian")
_STREAM = 67  # the attackers' generator stream (faults: 61)

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Attack:
    """A Byzantine attack's settings (the ``faults`` group's byzantine keys)."""

    fraction: float
    kind: str
    boost: float = 10.0
    noise_std: float = 200.0
    alie_z: float | None = None

    @staticmethod
    def from_config(fraction, kind, boost, noise_std, alie_z) -> Attack | None:
        """The attack, checked (ConfigError naming the key); None when the fraction is 0."""
        fraction = number("faults.byzantine_fraction", fraction, 0, 1, high_open=True)
        if kind not in ATTACKS:
            raise ConfigError("faults.attack", kind, f"must be one of {', '.join(ATTACKS)}")
        boost = number("faults.boost", boost)
        noise_std = number("faults.noise_std", noise_std, low=0, low_open=True)
        if alie_z is not None:
            alie_z = number("faults.alie_z", alie_z, low=0)
        return Attack(fraction, kind, boost, noise_std, alie_z) if fraction > 0 else None

    def count(self, num_clients: int) -> int:
        """``floor(fraction * N)`` (a hair of tolerance: ``0.3 * 10`` is 3)."""
        return math.floor(self.fraction * num_clients + 1e-9)

    def attackers(self, num_clients: int, seed: int) -> list[int]:
        """The malicious clients, sorted: a fixed draw from ``seed``."""
        rng = np.random.default_rng([seed, _STREAM])
        chosen = rng.choice(num_clients, size=self.count(num_clients), replace=False)
        return sorted(int(c) for c in chosen)


# ----------------------------------------------------------------------------- the attacks


def attacked(
    kind: str,
    reference: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    attack: Attack,
    rng: np.random.Generator | None = None,
) -> Arrays:
    """What an attacker of ``kind`` (``sign_flip``, ``scaled``, ``gaussian``) sends for its
    ``trained`` arrays, started from ``reference``; each in its trained dtype."""
    out = {}
    for k in sorted(trained):
        x = np.asarray(trained[k])
        r = np.asarray(reference[k], np.float64)
        d = x.astype(np.float64) - r
        if kind == "sign_flip":
            new = r - d
        elif kind == "scaled":
            new = r + attack.boost * d
        elif kind == "gaussian":
            new = r + attack.noise_std * rng.standard_normal(x.shape)
        else:
            raise ValueError(f"{kind} is not an attack on the update")
        out[k] = new.astype(x.dtype) if x.dtype.kind == "f" else x
    return out


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max``: ``Phi^-1((n - s) / n)``, ``s = max(floor(n/2 + 1) - f, 1)``."""
    s = max(math.floor(n / 2 + 1) - f, 1)
    return NormalDist().inv_cdf((n - s) / n)


def alie_arrays(benign: Sequence[Mapping[str, np.ndarray]], z: float) -> Arrays:
    """``mu - z sigma`` coordinatewise over ``benign`` (float64)."""
    out = {}
    for k in benign[0]:
        stack = np.stack([np.asarray(b[k], np.float64) for b in benign])
        out[k] = stack.mean(axis=0) - z * stack.std(axis=0)
    return out


def flip_labels(labels, num_classes: int):
    """``C - 1 - y`` (a tensor or an array, same type)."""
    return (num_classes - 1) - labels


# ----------------------------------------------------------------------------- the stage


class ByzantineClients(Stage):
    """The attack as a stage of the uplink chain, before compression (see the module
    docstring): client half for the update and label attacks, server half for ALIE."""

    name = "byzantine"
    needs_reference = True

    def __init__(self, attack: Attack, num_clients: int, seed: int, task: Any = None) -> None:
        self.attack, self.seed, self.task = attack, seed, task
        self.attackers = attack.attackers(num_clients, seed)
        self.malicious = set(self.attackers)

    # ---------------------------------------------------------------- client half
    def train_data(self, call, data):
        if self.attack.kind != "label_flip" or call.client not in self.malicious:
            return data
        key = self.task.label_key
        return {**data, key: flip_labels(data[key], int(self.task.num_classes))}

    def send(self, sending, out) -> None:
        call = sending.call
        if self.attack.kind not in ON_UPDATE or call.client not in self.malicious:
            return
        rng = np.random.default_rng([self.seed, call.server_round, call.client, _STREAM])
        out.arrays = attacked(self.attack.kind, sending.reference, out.numpy(), self.attack, rng)

    # ---------------------------------------------------------------- server half
    def wrap(self, inner):
        return _Omniscient(self, inner) if self.attack.kind == "alie" else inner

    def server_step(self) -> str:
        return "the byzantine stage's ALIE substitution (faults.attack=alie)"

    def replace_alie(self, updates: list) -> list:
        """The round's updates with every attacker's replaced by ALIE's ``mu - z sigma``."""
        bad = [u for u in updates if u.client in self.malicious]
        if not bad:
            return updates
        benign = [u.arrays for u in updates if u.client not in self.malicious]
        z = self.attack.alie_z
        if z is None:
            z = alie_z(len(updates), len(bad))
        value = alie_arrays(benign or [u.arrays for u in bad], z)
        out = []
        for u in updates:
            if u.client in self.malicious:
                arrays = {k: value[k].astype(np.asarray(v).dtype) for k, v in u.arrays.items()}
                u = replace(u, arrays=arrays)
            out.append(u)
        return out

    def report(self, server_round: int, clients: list[int]) -> dict[str, Any]:
        sampled = [c for c in clients if c in self.malicious]
        return {
            "byzantine": {
                "attack": self.attack.kind,
                "attackers_sampled": len(sampled),
                "attackers": sampled,
            }
        }

    def summary(self) -> dict[str, Any]:
        a = self.attack
        return {"attack": a.kind, "fraction": a.fraction, "attackers": self.attackers}


class _Omniscient:
    """ALIE's substitution around the aggregation inside it."""

    def __init__(self, stage: ByzantineClients, inner) -> None:
        self.stage, self.inner = stage, inner

    def aggregate(self, info, updates):
        return self.inner.aggregate(info, self.stage.replace_alie(updates))

    def linear(self, info, updates):
        return self.inner.linear(info, self.stage.replace_alie(updates))
