"""engine.num_threads=auto: every usable CPU for a model above 1M parameters, else 1; shared
among a sweep's parallel jobs; a number pins it (fedsim.threads)."""

from __future__ import annotations

import pytest
from torch import nn

from fedsim import threads
from fedsim.errors import ConfigError


def test_settings_are_auto_or_a_positive_integer():
    assert threads.setting("auto") == "auto"
    assert threads.setting(3) == 3
    for bad in (0, -1, 1.5, "two", None):
        with pytest.raises(ConfigError, match="must be an integer >= 1 or auto"):
            threads.setting(bad)


def test_auto_gives_big_models_every_cpu_and_small_ones_one(monkeypatch):
    monkeypatch.delenv(threads.PARALLEL_JOBS, raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    big = nn.Linear(1000, 1001)  # 1,002,001 parameters
    small = nn.Linear(1000, 999)  # 999,999 parameters
    assert threads.resolve("auto", big) == 8
    assert threads.resolve("auto", small) == 1
    assert threads.resolve(2, small) == 2 and threads.resolve(5, big) == 5
    monkeypatch.setenv(threads.PARALLEL_JOBS, "3")  # three jobs at once share the 8 CPUs
    assert threads.resolve("auto", big) == 2
    monkeypatch.setenv(threads.PARALLEL_JOBS, "16")
    assert threads.resolve("auto", big) == 1


def test_a_run_sets_the_resolved_threads(tmp_path, monkeypatch):
    """auto on the synthetic task's small model trains on one thread, and a pinned number
    is kept (the header names it)."""
    import torch

    from fedsim.api import run
    from tests.conftest import tiny

    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    run(tiny("sim.rounds=1", "engine.num_threads=auto"), output_dir=tmp_path / "a")
    assert seen and set(seen) == {1}
    monkeypatch.setattr(threads, "AUTO_ABOVE", 10)  # the tiny model counts as big
    seen.clear()
    run(tiny("sim.rounds=1", "engine.num_threads=auto"), output_dir=tmp_path / "b")
    assert seen and set(seen) == {2}
    torch.set_num_threads(1)
