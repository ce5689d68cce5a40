"""Fast errors: ``fedsim --help`` and a mistake the configuration alone shows import none of
the heavy libraries (PyTorch, Flower's datasets, Hugging Face ``datasets`` and
``transformers``), so that they answer in about a second (``benchmarks/startup.py`` times
them; no time is asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("torch", "flwr", "flwr_datasets", "datasets", "transformers")

#: a fresh interpreter runs the command's entry point, then lists the heavy modules loaded
_PROBE = """
import json, sys
from fedsim.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
else:
    code = 0
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


def _probe(*args: str, cwd, heavy: tuple[str, ...] = HEAVY) -> dict:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=heavy), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["--help"], 0, None),
        (["task=synthetic", "sim.rouds=3"], 2, "sim.rouds=3: unknown key in sim"),
        (["strategy=nope"], 2, "strategy=nope: unknown option"),
        (["sim.rounds=-1"], 2, "sim.rounds=-1: must be an integer >= 1"),
        (["task=synthetic", "sim.seed=2**40"], 2, "sim.seed"),
        (["task=synthetic", "quiet=maybe"], 2, "quiet=maybe"),
    ],
)
def test_light_path_imports_no_heavy_module(tmp_path, args, code, says):
    out = _probe(*args, cwd=tmp_path)
    assert out["code"] == code, out["stderr"][-2000:]
    if says is not None:
        assert says in out["stderr"]
    assert out["heavy"] == [], f"fedsim {' '.join(args)} imported {out['heavy']}"
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    "args, says",
    [
        (["strategy=local", "sim.prox_mu=0.1"], "sim.prox_mu=0.1: FedProx keeps"),
        (["compressor=topk", "compressor.ratio=2"], "compressor.ratio=2: must be a number"),
    ],
)
def test_a_check_that_needs_the_components_still_runs(tmp_path, args, says):
    """A component's value or a combination that only the built components refuse is still
    refused, with the same line. It imports the components' modules (PyTorch), but not the
    partitioner's libraries nor PyTorch's compiler (the partitioning and the optimizer's probe
    come after every combination is checked)."""
    out = _probe("task=synthetic", *args, cwd=tmp_path, heavy=(*HEAVY, "torch._dynamo"))
    assert out["code"] == 2
    assert says in out["stderr"]
    assert "torch" in out["heavy"]
    for late in ("flwr_datasets", "datasets", "torch._dynamo", "transformers"):
        assert late not in out["heavy"], f"imported {late} before refusing"
    assert list(tmp_path.iterdir()) == []
