"""Robust aggregation and Byzantine clients: the combinations that cannot run."""

from tests.bad_inputs import Case, small

#: the small run with six clients, all in every round (Krum with f=1 needs five)
SIX = ("sim.num_clients=6", "sim.clients_per_round=6")

CASES = [
    Case("robust-unknown-rule", small("robust=mean"), "robust=mean"),
    Case("robust-not-averaging", small("strategy=fedex", "robust=median"), "does not average"),
    Case("robust-local", small("strategy=local", "robust=median"), "does not average"),
    Case(
        "robust-central-dp",
        small("robust=median", "privacy=central"),
        "privacy=central replaces the aggregation",
    ),
    Case(
        "robust-ef21",
        small("robust=trimmed_mean", "compressor=topk", "feedback=ef21"),
        "feedback=ef21 takes its own server step",
    ),
    Case("robust-krum-too-few-clients", small("robust=krum"), "robust.f=1"),
    Case("robust-bulyan-too-few-clients", small(*SIX, "robust=bulyan"), "4f + 3 = 7"),
    Case("robust-multikrum-m", small(*SIX, "robust=multikrum", "robust.m=7"), "robust.m=7"),
    Case("robust-beta-half", small("robust=trimmed_mean", "robust.beta=0.5"), "robust.beta"),
    Case("byzantine-unknown-attack", small("faults=byzantine", "faults.attack=flip"), "flip"),
    Case("byzantine-no-attacker", small("faults=byzantine"), "= 0 malicious clients"),
    Case(
        "byzantine-fraction-one",
        small("faults=byzantine", "faults.byzantine_fraction=1.0"),
        "faults.byzantine_fraction",
    ),
    Case(
        "byzantine-nothing-sent",
        small("strategy=local", "faults=byzantine", "faults.byzantine_fraction=0.5"),
        "sends no updates to attack",
    ),
    Case(
        "byzantine-alie-compressed",
        small(
            "faults=byzantine",
            "faults.byzantine_fraction=0.5",
            "faults.attack=alie",
            "compressor=topk",
        ),
        "needs the plain arrays",
    ),
    Case(
        "robust-scaffold",
        small("robust=median", "control=scaffold"),
        "plain mean of the clients' control-variate changes",
    ),
    Case(
        "byzantine-alie-scaffold",
        small(
            "faults=byzantine",
            "faults.byzantine_fraction=0.5",
            "faults.attack=alie",
            "control=scaffold",
        ),
        "but not the control-variate changes",
    ),
]
