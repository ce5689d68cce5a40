"""The progress line within a round, its estimates, and what the round lines show."""

from __future__ import annotations

import io
import re

import pytest

from fedsim import meter
from fedsim.progress import Progress, RoundPrinter


@pytest.fixture(autouse=True)
def _not_in_a_sweep(monkeypatch):
    monkeypatch.delenv("FEDSIM_JOB_TAG", raising=False)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_estimates_from_the_rounds_done_and_the_share_of_steps():
    p = Progress(rounds=5, local_steps=10, out=io.StringIO(), live=False)
    p.begin(1, clients=4)
    assert p.left(3.0) == (None, None)  # nothing done yet, no round finished
    p.event("steps", 10)  # a quarter of 4 x 10 steps in 3 s: 9 s left of the round
    round_left, run_left = p.left(3.0)
    assert round_left == pytest.approx(9.0)
    assert run_left == pytest.approx(9.0 + 4 * 12.0)  # four more rounds of 12 s
    p.end(12.0)
    p.durations = [12.0, 8.0]
    p.begin(3, clients=4)
    p.event("client", 2)  # no steps reported (ray): half the clients in 5 s
    round_left, run_left = p.left(5.0)
    assert round_left == pytest.approx(5.0)
    assert run_left == pytest.approx(5.0 + 2 * 8.0)  # two more at 8 s (the first left out)
    p.end(10.0)
    assert p.run_left() == pytest.approx(2 * 9.0)


def test_plain_lines_only_for_long_rounds_when_not_a_terminal(monkeypatch):
    out = io.StringIO()
    printer = RoundPrinter(3, local_steps=5, out=out)
    assert not printer.progress.live
    printer.start()
    try:
        printer.begin_round(1, 2)
        meter.steps(3)
        assert out.getvalue() == ""  # under Progress.plain_every seconds: nothing
        monkeypatch.setattr(Progress, "plain_every", 0.0)
        meter.steps(2)
        meter.client_done()
        printer.evaluating()
    finally:
        printer.stop()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("round 1/3  clients 1/2  steps 5/10")
    assert "round ETA" in lines[-1] and "run ETA" in lines[-1]
    assert "\r" not in out.getvalue()
    meter.steps(1)  # stopped: nobody listens
    assert out.getvalue().splitlines() == lines


def test_live_line_is_rewritten_in_place_and_cleared_before_the_round_line(monkeypatch):
    monkeypatch.delenv("TERM", raising=False)
    out = FakeTerminal()
    printer = RoundPrinter(2, local_steps=1, out=out)
    assert printer.progress.live
    printer.start()
    try:
        printer.begin_round(1, 2)
        monkeypatch.setattr(printer.progress, "shown", -1e9)
        meter.steps(1)
        assert out.getvalue().startswith("\rround 1/2  clients 0/2  steps 1/2")
        printer.round(_record(1))
    finally:
        printer.stop()
    text = out.getvalue()
    last = text.rsplit("\r", 1)[-1]  # the progress line was blanked, then the round line
    assert last.startswith("round 1/2  loss 0.5000")
    assert "ETA" in last  # a round left, at the mean round time


def test_quiet_listens_to_nothing():
    out = io.StringIO()
    printer = RoundPrinter(2, quiet=True, local_steps=1, out=out)
    printer.start()
    printer.begin_round(1, 1)
    meter.steps(1)
    printer.round(_record(1))
    printer.final("done")
    printer.stop()
    assert out.getvalue() == "done\n"


def _record(r: int, **extra) -> dict:
    return {
        "round": r,
        "train_loss": 0.5,
        "eval_accuracy": 0.75,
        "eval_accuracy_client_mean": 0.7,
        "eval_accuracy_client_min": 0.5,
        "clients_evaluated": 2,
        "bytes_up": 1000,
        "bytes_down": 2000,
        "clients_ok": 2,
        "clients_failed": 0,
        "round_time_s": 1.25,
        **extra,
    }


def test_round_line_shows_epsilon_and_unevaluated_rounds():
    out = io.StringIO()
    printer = RoundPrinter(3, out=out)
    printer.round(_record(1, epsilon=2.345))
    skipped = {k: None for k in ("eval_accuracy", "eval_accuracy_client_mean")}
    printer.round(_record(2, **skipped, clients_evaluated=0))
    first, second = out.getvalue().splitlines()
    assert "eps 2.35" in first
    assert "acc - (not evaluated)" in second and "eps" not in second


def test_a_run_reports_every_step_and_client_and_names_its_device(tmp_path, monkeypatch, capsys):
    from fedsim.api import run
    from tests.conftest import tiny

    monkeypatch.setattr(Progress, "plain_every", 0.0)
    summary = run(
        tiny("sim.rounds=2", "sim.local_steps=3", "privacy=dpsgd"),
        output_dir=tmp_path / "r",
        quiet=False,
    )
    out = capsys.readouterr().out
    assert re.search(r"device cpu \(\d+ threads?\)", out.splitlines()[0])
    clients = 4
    final = [ln for ln in out.splitlines() if ln.startswith("round 2/2  clients")][-1]
    assert f"steps {clients * 3}/{clients * 3}" in final
    assert f"clients {clients}/{clients}" in out
    assert re.search(r"round 2/2  loss .* eps \d", out)
    assert summary["status"] == "ok"


@pytest.mark.parametrize("engine, warned", [("batched", True), ("inline", False)])
def test_the_batched_engine_says_when_it_will_not_pay_on_the_cpu(
    tmp_path, monkeypatch, capsys, engine, warned
):
    """Above BATCHED_ON_CPU parameters (1M; measured: 0.82x the plain loop for MiniLM) a
    batched run on the CPU says why engine=inline is faster; here the bound is lowered to the
    tiny model's size."""
    from fedsim.api import run
    from fedsim.apps.server import report
    from tests.conftest import tiny

    monkeypatch.setattr(report, "BATCHED_ON_CPU", 100)
    run(tiny("sim.rounds=1", f"engine={engine}"), output_dir=tmp_path / "r", quiet=False)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "engine=batched on the CPU" in ln]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert "engine=inline is faster here" in lines[0]
