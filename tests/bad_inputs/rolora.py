"""RoLoRA (``strategy=rolora``): the combinations that need the same parameters trained every
round, an adapter other than LoRA, and a bad ``first``."""

from tests.bad_inputs import Case, small

ALTERNATES = "strategy RoLoRA trains A and B in alternate rounds"

CASES = [
    Case("rolora-first", small("strategy=rolora", "strategy.first=C"), "strategy.first=C"),
    Case("rolora-adapter", small("strategy=rolora", "adapter=ffa"), "needs adapter=lora"),
    Case(
        "rolora-ef14",
        small("strategy=rolora", "compressor=topk", "feedback=ef14"),
        f"keeps memories of a fixed set of parameters; {ALTERNATES}",
    ),
    Case(
        "rolora-ef21",
        small("strategy=rolora", "compressor=topk", "feedback=ef21"),
        ALTERNATES,
    ),
    Case(
        "rolora-scaffold",
        small("strategy=rolora", "control=scaffold"),
        f"SCAFFOLD's variates track the server's mean of the clients' changes; {ALTERNATES}",
    ),
    Case(
        "rolora-server-opt",
        small("strategy=rolora", "server_opt=adam"),
        f"{ALTERNATES}: the momentum of an array's earlier rounds would move it",
    ),
    Case(
        "rolora-batched-kept-state",
        small("strategy=rolora", "engine=batched", "sim.keep_optimizer_state=true"),
        "sim.keep_optimizer_state=True: the batched trainer keeps the state",
    ),
]
