"""Configuration mistakes on the command line."""

from tests.bad_inputs import Case, small

CASES = [
    Case("rounds-negative", small("sim.rounds=-1"), "sim.rounds=-1"),
]
