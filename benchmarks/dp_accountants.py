"""The noise each accountant picks for the shipped DP presets (the table in docs/privacy.md).

    python benchmarks/dp_accountants.py            # markdown table on stdout
    python benchmarks/dp_accountants.py --json     # the rows as JSON
    python benchmarks/dp_accountants.py --timing   # and the seconds of one PRV epsilon

For every shipped configuration with DP (``privacy=central`` and ``privacy=dpsgd`` on each
task's defaults, and the experiments ``central_dp_compression`` and ``dp_fedsb_vs_fedit`` at
each of their epsilons), the configuration is composed as ``fedsim`` composes it and its
privacy component computes, as a run does:

- the noise multiplier for the target epsilon with ``privacy.accountant=rdp`` and with ``prv``
  (Opacus' search, within 0.01 of the target);
- the epsilon the PRV accountant reports for the RDP noise (what switching the accountant gives
  for the same noise);
- under central DP, the update's noise multiplier with adaptive clipping at the paper's
  ``sigma_b = q N / 20`` (refused where ``z >= 2 sigma_b``);
- with ``--timing``, how long that one PRV epsilon took (fedsim computes one per round under
  central DP and per client and round under DP-SGD; a search for a target about twenty).

Central DP: one step per round at ``q = clients_per_round / num_clients``, ``delta = 1 / (10 N)``.
DP-SGD: each client's worst case, ``rounds x local_steps`` steps at ``q = batch / n``,
``delta = 1 / (10 n)``; shown for the client of median size ``n`` (the noise is per client).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TASKS = ("synthetic", "sentiment", "news", "math")
PRESETS = [
    *[(f"task={t} privacy=central", [f"task={t}", "privacy=central"]) for t in TASKS],
    ("+experiment=central_dp_compression", ["+experiment=central_dp_compression"]),
    *[(f"task={t} privacy=dpsgd", [f"task={t}", "privacy=dpsgd"]) for t in TASKS],
    *[
        (
            f"+experiment=dp_fedsb_vs_fedit, epsilon {e}",
            ["+experiment=dp_fedsb_vs_fedit", f"privacy.target_epsilon={e}"],
        )
        for e in (1, 3, 8)
    ],
]


def _components(overrides: list[str], kind: str):
    from fedsim.build import build_components
    from fedsim.config import compose

    cfg, _ = compose([*overrides, f"privacy.accountant={kind}"])
    return build_components(cfg)


def _timed_prv(accountant, delta: float) -> dict:
    """PRV's epsilon for RDP's noise, and the seconds it took (a history not computed before:
    nothing cached)."""
    start = time.perf_counter()
    eps = accountant.epsilon(delta)
    return {"prv_eps_at_rdp_sigma": eps, "prv_epsilon_s": time.perf_counter() - start}


def central_row(overrides: list[str]) -> dict:
    from fedsim.errors import ConfigError
    from fedsim.privacy import Accountant
    from fedsim.privacy.adaptive import update_multiplier

    sigmas = {}
    for kind in ("rdp", "prv"):
        c = _components(overrides, kind)
        sim, dp = c.sim, c.privacy
        init = c.adapter.data_init
        setup = init.client_steps if init is not None else 0
        steps = sim["rounds"] + setup
        dp.start(sim["num_clients"], sim["clients_per_round"], sim["rounds"], init_steps=setup)
        sigmas[kind] = dp.sigma_value
    n = sim["num_clients"]
    q, delta = dp.q, dp.delta_for(n)
    try:
        adaptive = update_multiplier(sigmas["rdp"], q * n / 20)
    except ConfigError:
        adaptive = None
    return {
        "mode": "central",
        "q": q,
        "steps": steps,
        "delta": delta,
        "target": dp.target_epsilon,
        "sigma_rdp": sigmas["rdp"],
        "sigma_prv": sigmas["prv"],
        **_timed_prv(Accountant([(sigmas["rdp"], q, steps)], "prv"), delta),
        "adaptive_update_sigma": adaptive,
    }


def dpsgd_row(overrides: list[str]) -> dict:
    from fedsim.privacy import Accountant

    sigmas = {}
    for kind in ("rdp", "prv"):
        c = _components(overrides, kind)
        sizes = [c.data.num_train(i) for i in range(c.sim["num_clients"])]
        n = int(statistics.median_low(sizes))
        batch = c.strategy.client_batch_size(c.sim["batch_size"])
        steps = c.total_local_steps
        init = c.adapter.data_init
        setup = init.client_steps if init is not None else 0
        sigmas[kind] = c.privacy.sigma_for(n, batch, steps, setup)
    dp = c.privacy
    q, delta = dp.sample_rate(n, batch), dp.delta_for(n)
    return {
        "mode": "dpsgd",
        "n": n,
        "q": q,
        "steps": steps,
        "delta": delta,
        "target": dp.target_epsilon,
        "sigma_rdp": sigmas["rdp"],
        "sigma_prv": sigmas["prv"],
        **_timed_prv(
            Accountant([(sigmas["rdp"], 1.0, setup), (sigmas["rdp"], q, steps)], "prv"), delta
        ),
        "adaptive_update_sigma": None,
    }


def rows() -> list[dict]:
    out = []
    for name, overrides in PRESETS:
        row = central_row(overrides) if "dpsgd" not in name and "fedit" not in name else None
        row = row or dpsgd_row(overrides)
        out.append({"preset": name, **row})
    return out


def table(data: list[dict]) -> str:
    lines = [
        "| preset | q | steps | delta | target epsilon | sigma: rdp | sigma: prv | prv / rdp "
        "| prv's epsilon at rdp's sigma | adaptive clipping: z_Delta |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data:
        n = f" (median client, n = {r['n']})" if r["mode"] == "dpsgd" else ""
        adaptive = r["adaptive_update_sigma"]
        shown = (
            "n/a"
            if r["mode"] == "dpsgd"
            else ("refused" if adaptive is None else f"{adaptive:.3f}")
        )
        lines.append(
            f"| `{r['preset']}`{n} | {r['q']:.3g} | {r['steps']} | {r['delta']:.3g} "
            f"| {r['target']:g} | {r['sigma_rdp']:.3f} | {r['sigma_prv']:.3f} "
            f"| {r['sigma_prv'] / r['sigma_rdp']:.3f} | {r['prv_eps_at_rdp_sigma']:.2f} | {shown} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="the rows as JSON")
    parser.add_argument("--timing", action="store_true", help="seconds of one PRV epsilon")
    args = parser.parse_args()
    data = rows()
    print(json.dumps(data, indent=1) if args.json else table(data))
    if args.timing and not args.json:
        seconds = sorted(r["prv_epsilon_s"] for r in data)
        print(f"\none PRV epsilon: {seconds[0]:.3f} to {seconds[-1]:.3f} s over these presets")


if __name__ == "__main__":
    main()
