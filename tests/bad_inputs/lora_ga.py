"""LoRA's ``adapter.init`` (LoRA-GA): unknown methods and keys, settings out of range, a rank
whose ``2r`` singular vectors a layer does not have, and strategies that cannot keep it."""

from tests.bad_inputs import Case, small

GA = "adapter.init.method=lora_ga"

CASES = [
    Case(
        "lora-init-unknown-method", small("adapter.init.method=svd"), "must be default or lora_ga"
    ),
    Case("lora-init-unknown-key", small("+adapter.init.foo=1"), "adapter.init.foo=1: unknown key"),
    # the set-up's keys are checked with method=default too (which has no set-up)
    Case(
        "lora-init-source-default",
        small("adapter.init.source=elsewhere"),
        "adapter.init.source=elsewhere: must be server or clients",
    ),
    Case(
        "lora-init-examples-default",
        small("adapter.init.examples=-5"),
        "adapter.init.examples=-5: must be an integer >= 1",
    ),
    Case(
        "lora-ga-rank-over-half",
        small(GA, "adapter.r=20"),
        "adapter.r=20: adapter.init.method=lora_ga takes 2r = 40 singular vectors",
    ),
    Case("lora-ga-direction", small(GA, "adapter.init.direction=up"), "direction=up: must be"),
    Case("lora-ga-scale", small(GA, "adapter.init.scale=big"), "adapter.init.scale=big: must be"),
    Case("lora-ga-gamma", small(GA, "adapter.init.stable_gamma=0"), "stable_gamma=0: must be"),
    Case("lora-ga-source", small(GA, "adapter.init.source=public"), "source=public: must be"),
    Case(
        "lora-ga-examples",
        small(GA, "adapter.init.examples=100000"),
        "must be at most the task's server split",
    ),
    Case(
        "lora-ga-flora",
        small(GA, "strategy=flora"),
        "adapter.init.method=lora_ga: strategy FLoRA does not keep the clients' adapters",
    ),
    Case("lora-ga-ffa", small("adapter=ffa", f"+{GA}"), "unknown key; allowed: alpha, dropout"),
]
