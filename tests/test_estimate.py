"""``estimate=true``: the printed sizes agree with the built model and with what a real run
measures; nothing is trained or written; a bad value is a one-line configuration error."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny


def _estimate(overrides: list[str], tmp_path, capsys) -> tuple[dict, str]:
    from fedsim.api import run

    capsys.readouterr()
    out = tmp_path / "estimate"
    found = run([*overrides, "estimate=true"], output_dir=out)
    printed = capsys.readouterr().out
    assert found["estimate"] is True
    assert not out.exists(), "an estimate writes no folder"
    return found, printed


def _trainable(overrides: list[str]) -> int:
    from fedsim.build import build_components
    from fedsim.config import compose

    cfg, _ = compose(overrides)
    model, _ = build_components(cfg).model()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _printed_count(printed: str, label: str) -> int:
    match = re.search(rf"^  {label}\s+([\d,]+) parameters", printed, re.M)
    assert match, printed
    return int(match.group(1).replace(",", ""))


def _first_round(overrides: list[str], tmp_path) -> dict:
    from fedsim.api import run
    from fedsim.results import read_metrics

    out = tmp_path / "run"
    run([*overrides, "sim.rounds=1"], output_dir=out)
    return read_metrics(out)[1]


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])
def test_synthetic_sizes_equal_a_real_run(strategy, tmp_path, capsys):
    overrides = tiny(f"strategy={strategy}", "sim.clients_per_round=2")
    found, printed = _estimate(overrides, tmp_path, capsys)
    assert _printed_count(printed, "trainable") == _trainable(overrides)
    assert found["model"]["trainable_parameters"] == _trainable(overrides)
    assert "computed: these sizes depend on shapes and dtypes only" in printed
    row = _first_round(overrides, tmp_path)
    traffic = found["traffic"]
    assert traffic["up_raw"] == traffic["up_first"] == row["bytes_up"] / row["clients_ok"]
    assert traffic["down_first"] == row["bytes_down"] / row["clients_sampled"]
    if strategy == "fedsb":  # B and A from data, once: in the first downlink only
        assert traffic["one_time"]["frozen/*"] > 0
        assert traffic["down_later"] == traffic["down_first"] - traffic["one_time"]["frozen/*"]
        assert re.search(r"of which frozen/\*.*one-time", printed)


def test_hf_task_sizes_equal_a_real_run(hf_task, tmp_path, capsys):
    overrides = tiny(*hf_task, "strategy=fedsb", "sim.num_clients=3", "sim.batch_size=8")
    found, printed = _estimate(overrides, tmp_path, capsys)
    assert _printed_count(printed, "trainable") == _trainable(overrides)
    assert _printed_count(printed, "total") > _printed_count(printed, "trainable")
    row = _first_round([*overrides, "sim.local_steps=1"], tmp_path)
    traffic = found["traffic"]
    assert traffic["up_raw"] == traffic["up_first"] == row["bytes_up"] / row["clients_ok"]
    assert traffic["down_first"] == row["bytes_down"] / row["clients_sampled"]
    assert found["memory"]["rows"]["activations"] > 0


def test_a_compressed_uplink_is_measured_within_ten_percent(tmp_path, capsys):
    overrides = tiny("compressor=topk")
    found, printed = _estimate(overrides, tmp_path, capsys)
    assert (
        "measured on a random update" in printed and "coded sizes depend on the values" in printed
    )
    row = _first_round(overrides, tmp_path)
    actual = row["bytes_up"] / row["clients_ok"]
    assert found["traffic"]["up_first"] == pytest.approx(actual, rel=0.10)
    assert found["traffic"]["up_raw"] > 5 * found["traffic"]["up_first"]


def test_activations_grow_with_the_batch_roughly_linearly():
    from fedsim.build import build_components
    from fedsim.config import compose
    from fedsim.estimate.memory import activation_bytes, probe_batch

    cfg, _ = compose(tiny())
    c = build_components(cfg)
    model, _ = c.model()
    sizes = {b: activation_bytes(model, c.task, probe_batch(c.task, b, None)) for b in (8, 16, 32)}
    assert sizes[8] > 0
    assert 1.6 < sizes[16] / sizes[8] < 2.4
    assert 1.6 < sizes[32] / sizes[16] < 2.4


def test_memory_adds_the_per_example_gradients_of_dp_sgd(tmp_path, capsys):
    plain, _ = _estimate(tiny(), tmp_path, capsys)
    dp, printed = _estimate(tiny("privacy=dpsgd"), tmp_path, capsys)
    extra = dp["memory"]["rows"]["DP-SGD per-example gradients"]
    assert extra == 16 * plain["model"]["trainable_parameters"] * 4
    assert dp["memory"]["total"] == plain["memory"]["total"] + extra
    assert "free memory" in printed and "clients fits" in printed


def test_the_command_prints_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim", "estimate=true", "task=synthetic", f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for heading in ("model (computed", "communication per client", "memory per client on cpu"):
        assert heading in proc.stdout
    assert not (out / "metrics.jsonl").exists()
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, key",
    [(["estimate=maybe"], "estimate=maybe"), (["-m", "estimate=true,false"], "estimate=")],
)
def test_a_bad_estimate_is_one_line(argv, key, tmp_path, capsys):
    from fedsim.cli import main

    with pytest.raises(SystemExit) as stop:
        main([*tiny(), *argv, f"hydra.run.dir={tmp_path / 'run'}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedsim: error: {key}"), err
    assert not (tmp_path / "run").exists()
