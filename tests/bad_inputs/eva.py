"""EVA's initialisation of LoRA (adapter.init.method=eva): its keys and what it cannot run with."""

from tests.bad_inputs import Case, small

EVA = ("adapter.init.method=eva",)

CASES = [
    Case("eva-init-unknown-key", small(*EVA, "+adapter.init.whiten=true"), "adapter.init.whiten"),
    Case("eva-init-method-unknown", small("adapter.init.method=pissa"), "adapter.init.method"),
    Case("eva-rho-below-one", small(*EVA, "adapter.init.rho=0.5"), "adapter.init.rho=0.5"),
    # the tiny synthetic net's layers are 32 x 32: round(5 * 8) = 40 components do not fit
    Case("eva-rank-above-layer", small(*EVA, "adapter.init.rho=5"), "min(m, n) = 32"),
    Case(
        "eva-central-dp",
        small(*EVA, "adapter.init.source=clients", "privacy=central"),
        "privacy=central",
    ),
    Case(
        "eva-flora",
        small(*EVA, "strategy=flora"),
        "strategy FLoRA does not keep the clients' adapters",
    ),
    Case(
        "eva-ffa",
        small("strategy=ffa", "+adapter.init.method=eva"),
        "unknown key; allowed: alpha, dropout",
    ),
    Case(
        "eva-flexlora",
        small("strategy=flexlora", "adapter.init.method=eva"),
        "strategy FlexLoRA does not keep the clients' adapters",
    ),
    Case(
        "eva-hetlora-layer-ranks",
        small("strategy=hetlora", "adapter.init.method=eva"),
        "adapter.init.rho=2.0: strategy HetLoRA sizes every layer's adapter at adapter.r",
    ),
]
