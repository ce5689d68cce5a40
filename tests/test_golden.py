"""The golden corpus (tests/golden/cases.py): every case reruns and gives its stored files.

On the numeric platform the corpus was made on (same float kernels: ``platform.json``), the
files must be identical byte for byte. Elsewhere (another CPU's vector kernels: try
``ATEN_CPU_CAPABILITY=avx2``), everything but floats must be identical, floats equal to a
relative 1e-4 or both at rounding level (below 1e-6: an export's float32 relative error), and
the exported adapter's byte hash present where it was (bit-identity is not defined across CPUs
and library builds).
"""

from __future__ import annotations

import json

import pytest

from tests.golden.cases import CASES, CUT, HERE, fingerprint, produce, same_up_to_floats

SAME_PLATFORM = json.loads((HERE / "platform.json").read_text())["fingerprint"] == fingerprint()


def _parse(file: str, text: str):
    if file.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines()]
    return json.loads(text)


def test_the_corpus_is_complete():
    stored = {p.name for p in HERE.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert stored == set(CASES), "regenerate: python -m tests.golden.cases --write"
    assert len([n for n, c in CASES.items() if not c.get("error")]) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_golden(name):
    got = produce(name)
    folder = HERE / name
    stored = {p.name for p in folder.iterdir() if p.is_file()}
    assert set(got) == stored, f"{name}: files {sorted(got)} against stored {sorted(stored)}"
    for file, text in got.items():
        want = (folder / file).read_text()
        if SAME_PLATFORM:
            assert text == want, f"{name}/{file} differs from the golden file"
        else:
            assert same_up_to_floats(_parse(file, text), _parse(file, want)), (
                f"{name}/{file} differs from the golden file beyond float rounding"
            )
    if CASES[name].get("resume_after"):
        assert (folder / CUT / "checkpoint.safetensors").is_file()


def test_the_cross_platform_comparison_can_fail():
    want = {"accuracy": 0.8125, "error": 5e-8, "adapter_sha256": "ab", "rounds": [1, 2]}
    assert same_up_to_floats({**want, "error": 3e-8, "adapter_sha256": "cd"}, want)
    assert not same_up_to_floats({**want, "accuracy": 0.8130}, want)
    assert not same_up_to_floats({**want, "error": 2e-6}, want)
    assert not same_up_to_floats({**want, "adapter_sha256": None}, want)
    assert not same_up_to_floats({**want, "rounds": [1, 3]}, want)
    assert not same_up_to_floats({k: v for k, v in want.items() if k != "error"}, want)
