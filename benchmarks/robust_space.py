"""Which space a robust rule works in: the sent arrays (fedsim, as Flower) against each client's
``dW``.

    python benchmarks/robust_space.py                  # 3 seeds, rounds 1-3, 10 clients
    python benchmarks/robust_space.py --seeds 5 --rounds 5

fedsim's robust rules (``robust=median``...) act on the arrays clients send. For FedIT on LoRA
those are the factors ``A_i``, ``B_i``; the model moves by ``s B A`` of the rule's factors, which
is not the rule applied to the clients' own updates ``dW_i = s B_i A_i``. For Fed-SB the sent
array is ``R_i`` between frozen ``B`` and ``A``, so the rule's ``dW`` is ``B rule(R_i) A``:
linear in the rule's output, but coordinatewise rules do not commute with ``R -> B R A`` either.

The measurement: real rounds of the synthetic task (10 honest clients, every one per round);
in each round the clients' replies are taken as the server receives them, and for each rule

    err = || rule_i(dW_i) - dW(rule_i(sent_i)) ||_F / || rule_i(dW_i) - dW_current ||_F

over all adapted layers together (``rule_i(dW_i)`` coordinatewise on the dense ``m x n``
updates, distances between the flattened ``dW_i`` for the Krum family). ``none`` is the plain
mean: FedIT's known inexactness, 0 for Fed-SB. Printed per strategy and rule as the mean and
the max over seeds and rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RULES = ("none", "median", "trimmed_mean", "krum", "multikrum", "bulyan")


def rules():
    from fedsim.robust import Bulyan, Krum, Median, MultiKrum, Robust, TrimmedMean

    made = (Robust(), Median(), TrimmedMean(0.2), Krum(1), MultiKrum(1), Bulyan(1))
    return dict(zip(RULES, made))


def captured_rounds(strategy: str, seed: int, rounds: int) -> list[tuple]:
    """``(spec, frozen, current, updates, weights)`` of each round of a real run."""
    from fedsim.api import run
    from fedsim.strategy import Federation

    seen = []
    original = Federation.aggregate_train

    def capture(self, server_round, replies):
        replies = list(replies)
        updates = self.updates_from(replies)
        s, spec = self.strategy, self.ctx.spec
        seen.append((spec, dict(self.frozen), dict(s.current), updates, s.weights(updates)))
        return original(self, server_round, replies)

    args = [
        "task=synthetic",
        f"strategy={strategy}",
        "sim.num_clients=10",
        f"sim.rounds={rounds}",
        f"sim.seed={seed}",
        "quiet=true",
        "export=false",
        "checkpoint.every=0",
    ]
    Federation.aggregate_train = capture
    try:
        with tempfile.TemporaryDirectory() as out:
            run(args, output_dir=Path(out) / "run")
    finally:
        Federation.aggregate_train = original
    return seen


def space_error(spec, frozen, current, updates, p, rule) -> float:
    """``err`` of the module docstring for one round."""
    modules = list(spec.factors)
    dws = [spec.deltas({**frozen, **u.arrays}, modules) for u in updates]
    on_dw = rule.aggregate(dws, p)
    sent = rule.aggregate([u.arrays for u in updates], p)
    via_sent = spec.deltas({**frozen, **sent}, modules)
    now = spec.deltas({**frozen, **current}, modules)
    num = sum(float(np.sum((on_dw[m] - via_sent[m]) ** 2)) for m in modules)
    den = sum(float(np.sum((on_dw[m] - now[m]) ** 2)) for m in modules)
    return float(np.sqrt(num / den))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    table = {}
    for strategy in ("fedavg", "fedsb"):
        errors = {name: [] for name in RULES}
        for seed in range(a.seeds):
            for captured in captured_rounds(strategy, seed, a.rounds):
                for name, rule in rules().items():
                    errors[name].append(space_error(*captured, rule))
        table[strategy] = errors
    print(f"relative Frobenius error, {a.seeds} seeds x rounds 1-{a.rounds}, 10 clients")
    print("| rule | FedIT (A, B sent) mean | max | Fed-SB (R sent) mean | max |")
    print("|---|---|---|---|---|")
    for name in RULES:
        it, sb = table["fedavg"][name], table["fedsb"][name]
        print(
            f"| `{name}` | {np.mean(it):.3g} | {np.max(it):.3g} | "
            f"{np.mean(sb):.3g} | {np.max(sb):.3g} |"
        )


if __name__ == "__main__":
    main()
