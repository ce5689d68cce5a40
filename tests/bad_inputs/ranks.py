"""Heterogeneous client ranks (adapter.client_ranks; docs/strategies.md)."""

from tests.bad_inputs import Case, small

TIERS = "adapter.client_ranks={4: 0.5, 8: 0.3}"

CASES = [
    Case("ranks-tiers-sum", small("strategy=hetlora", TIERS), "must sum to 1"),
    Case(
        "ranks-above-r",
        small("strategy=flexlora", "adapter.r=8", "adapter.client_ranks=[4,16]"),
        "at most adapter.r=8",
    ),
    Case(
        "ranks-above-layer",
        small("strategy=flora", "adapter.r=64", "adapter.client_ranks=[64]"),
        "adapter.client_ranks=[64]: its rank 64 must be at most min(m, n)",
    ),
    Case(
        "ranks-tier-above-layer",
        small("strategy=hetlora", "adapter.r=64", "adapter.client_ranks={2: 0.5, 64: 0.5}"),
        "adapter.client_ranks={2: 0.5, 64: 0.5}: its rank 64 must be at most min(m, n)",
    ),
    Case("ranks-zero", small("strategy=hetlora", "adapter.client_ranks=[0,4]"), "at least 1"),
    Case(
        "ranks-too-many",
        small("strategy=flora", "adapter.client_ranks=[1,2,3,4,5]"),
        "more entries than sim.num_clients=4",
    ),
    Case(
        "ranks-old-key",
        small("strategy=flora", "strategy.client_ranks=[2,4]"),
        "strategy.client_ranks=[2,4]: moved to adapter.client_ranks",
    ),
    Case(
        "ranks-fedavg",
        small("adapter.client_ranks=[2,4]"),
        "need strategy=flexlora, flora or hetlora",
    ),
    Case(
        "ranks-ffa",
        small("strategy=ffa", "adapter=ffa", "adapter.client_ranks=[2,4]"),
        "adapter.client_ranks=[2,4]: unknown key in adapter",
    ),
    Case(
        "ranks-with-data-init",
        small("strategy=hetlora", "adapter.client_ranks=[2,4]", "adapter.init.method=lora_ga"),
        "cannot share adapter.init.method=lora_ga's initialisation",
    ),
    Case("ranks-hetlora-topk", small("strategy=hetlora", "compressor=topk"), "compressor=none"),
    Case(
        "ranks-flexlora-downlink",
        small("strategy=flexlora", "downlink=topk"),
        "use downlink=none",
    ),
    Case(
        "ranks-hetlora-batched",
        small("strategy=hetlora", "engine=batched"),
        "prunes each client's rank",
    ),
    Case(
        "ranks-batched-mixed",
        small("strategy=flexlora", "engine=batched", "adapter.client_ranks=[2,4]"),
        "cannot train in one batched call",
    ),
    Case("ranks-gamma", small("strategy=hetlora", "strategy.prune_gamma=1"), "prune_gamma"),
]
