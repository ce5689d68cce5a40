"""GPU readiness (issue 25, items 3 and 4), checked on the CPU: the device in summary.json,
gpu_peak_mem_bytes only on CUDA, engine.group_size=auto, the ray engine's GPU shares, and the
GPU benchmark's arguments and table (benchmarks/gpu.py; the benchmark itself is not run
here). The CUDA-only checks skip without a GPU."""

from __future__ import annotations

import platform

import pytest
import torch

from fedsim.errors import ConfigError

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


# ----------------------------------------------------------------------------- results


def test_cpu_runs_name_their_device_and_have_no_gpu_memory_field(run_tiny):
    summary, rows, _ = run_tiny()
    assert summary["device"] == "cpu"
    assert summary["device_name"] == (platform.processor() or "cpu")
    assert all("gpu_peak_mem_bytes" not in r for r in rows)


def test_the_golden_comparison_ignores_the_machine():
    from tests.golden.cases import _stable

    summary = {"status": "ok", "device": "cuda:0", "device_name": "NVIDIA H100", "seed": 0}
    assert _stable(summary) == {"status": "ok", "seed": 0}


@needs_cuda
def test_cuda_runs_record_each_rounds_peak_gpu_memory(run_tiny):
    summary, rows, _ = run_tiny("sim.device=cuda")
    assert summary["device"].startswith("cuda:")
    assert summary["device_name"] == torch.cuda.get_device_name(int(summary["device"][5:]))
    assert all(r["gpu_peak_mem_bytes"] > 0 for r in rows)


# ----------------------------------------------------------------------------- group size


def test_group_size_takes_integers_and_auto():
    from fedsim.engines import BatchedEngine

    assert BatchedEngine(group_size="auto").group_size == "auto"
    assert BatchedEngine(group_size=3).group_size == 3
    for bad in (0, -1, "big", 2.5, True):
        with pytest.raises(ConfigError, match="must be an integer >= 1, or auto"):
            BatchedEngine(group_size=bad)


def test_group_size_auto_is_the_default_on_the_cpu(run_tiny):
    from fedsim.engines.group_size import CPU_GROUP, resolve

    class Components:
        device = torch.device("cpu")

    assert resolve(Components(), None, {}) == CPU_GROUP == 32
    summary, rows, out = run_tiny("engine=batched", "engine.group_size=auto")
    assert summary["status"] == "ok" and "engine.group_size" not in summary
    assert "group_size: auto" in (out / "config.yaml").read_text()


def test_the_largest_group_that_fits():
    from fedsim.engines.group_size import MARGIN, choose

    assert MARGIN == 0.8
    assert choose(per_client=100, fixed=50, free=1000, clients=64) == 7  # 750 // 100
    assert choose(per_client=100, fixed=0, free=10**9, clients=64) == 64  # the round's clients
    assert choose(per_client=10**9, fixed=0, free=1000, clients=64) == 1  # not even one fits
    assert choose(per_client=100, fixed=5000, free=1000, clients=64) == 1


def test_the_probe_takes_the_longest_examples_repeated_to_a_batch():
    from fedsim.engines.group_size import _probe_batch

    class Task:
        label_key = "y"

    data = {"y": torch.arange(5), "x": torch.arange(5) * 10}
    assert _probe_batch(Task, data, 3)["y"].tolist() == [2, 3, 4]
    assert _probe_batch(Task, data, 7)["x"].tolist() == [0, 10, 20, 30, 40, 0, 10]


@needs_cuda
def test_group_size_auto_on_cuda_fits_the_round(run_tiny, capsys):
    summary, _, _ = run_tiny(
        "engine=batched", "engine.group_size=auto", "sim.device=cuda", "sim.num_clients=6"
    )
    assert summary["status"] == "ok"
    line = [x for x in capsys.readouterr().err.splitlines() if "group_size=auto ->" in x]
    assert line and 1 <= int(line[0].split("-> ")[1].split()[0]) <= 6


# ----------------------------------------------------------------------------- ray


def test_ray_clients_take_shares_of_a_gpu_or_whole_gpus():
    from fedsim.engines import RayEngine

    for ok in (0, 0.0, 0.25, 0.5, 1, 1.0, 2, 3.0):
        assert RayEngine(num_gpus_per_client=ok).num_gpus_per_client == ok
    for bad in (-0.5, 1.5, 2.25, float("nan"), "half"):
        with pytest.raises(ConfigError, match="a share of one GPU in"):
            RayEngine(num_gpus_per_client=bad)
    assert RayEngine(num_gpus=2).num_gpus == 2
    with pytest.raises(ConfigError, match="engine.num_gpus=0.5: must be a whole number"):
        RayEngine(num_gpus=0.5)


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_arguments():
    from benchmarks import gpu

    args = gpu.parse_args(["--device", "cpu", "--tiny", "--out", "x", "task.precision=bfloat16"])
    assert (args.device, args.tiny, args.minutes) == ("cpu", True, 7.0)
    assert args.tasks == ["sentiment", "math"] and args.variants == ["plain", "batched", "inline"]
    assert args.overrides == ["task.precision=bfloat16"]
    assert gpu.parse_args(["--tasks", "math", "--variants", "plain,batched"]).tasks == ["math"]
    for bad in (
        ["--tasks", "news"],
        ["--variants", "ray"],
        ["--minutes", "0"],
        ["--device", "tpu"],
    ):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)


def test_benchmark_workloads():
    from benchmarks import gpu

    full = gpu.effective(gpu.overrides_for("sentiment", "cuda", False, []))
    assert {"sim.clients_per_round=64", "sim.device=cuda", "sim.rounds=2"} <= set(full)
    math = gpu.effective(gpu.overrides_for("math", "cuda", False, ["sim.rounds=3"]))
    assert {"task=math", "sim.clients_per_round=16", "sim.rounds=3"} <= set(math)
    tiny = gpu.effective(gpu.overrides_for("sentiment", "cpu", True, []))
    assert "sim.clients_per_round=8" in tiny and "sim.clients_per_round=64" not in tiny
    assert gpu.client_steps(tiny) == 8 * 2


def _variant(name, train_s, peak=None, status="ok"):
    return {"variant": name, "status": status, "train_s": train_s, "peak_gpu_bytes": peak}


def test_benchmark_table_and_goal():
    from benchmarks import gpu

    results = {
        "sentiment": {
            "client_steps": 512,
            "overrides": [],
            "variants": [
                _variant("plain", [11.0, 10.24], 2**30),
                _variant("batched", [0.9, 0.8], 3 * 2**30),
                _variant("inline", [], None, "out of time"),
            ],
        }
    }
    lines = gpu.table(results)
    assert lines[0].startswith("| task | variant |") and len(lines) == 5
    assert lines[2] == "| sentiment | plain | 2 | 10.240 | 50.0 | 1.00x | 1.00 GiB | ok |"
    assert lines[3] == "| sentiment | batched | 2 | 0.800 | 640.0 | 12.80x | 3.00 GiB | ok |"
    assert lines[4] == "| sentiment | inline | 0 | - | - | - | - | out of time |"
    assert gpu.goal_line(results) == "goal (batched >= 10x plain on sentiment): 12.80x, met"
    results["sentiment"]["variants"][1]["train_s"] = []
    assert gpu.goal_line(results).endswith("not measured")
    assert gpu.goal_line({}) is None


def test_benchmark_times_and_bytes():
    from benchmarks import gpu

    rows = [
        {"round": 0, "round_time_s": 0.5, "eval_time_s": 0.5},
        {"round": 1, "round_time_s": 3.0, "eval_time_s": 1.0},
        {"round": 2, "round_time_s": 2.5},
    ]
    assert gpu.train_times(rows) == [2.0, 2.5]
    assert gpu.rate(_variant("x", [2.0, 2.5]), 10) == 5.0
    assert gpu.rate(_variant("x", []), 10) is None
    assert [gpu.human_bytes(n) for n in (None, 512, 2048, 5 * 2**20)] == [
        "-",
        "512 B",
        "2.00 KiB",
        "5.00 MiB",
    ]


def test_benchmark_random_weights_keep_the_architecture_and_tokenizer(tmp_path):
    """gpu.py --random-weights: a bundle's models (configuration and tokenizer, no weights)
    become loadable folders with random weights (here: the tests' tiny BERT and Llama)."""
    import shutil

    from benchmarks.gpu_bundle import random_models
    from fedsim.tasks.hf_models import load_causal_lm, load_classifier
    from tests.tiny_lm import make_llama
    from tests.tiny_text import make_model

    for name, make in (("minilm", make_model), ("smollm2", make_llama)):
        full = make(tmp_path / "full" / name)
        (tmp_path / "bundle" / name).mkdir(parents=True)
        for f in full.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp_path / "bundle" / name / f.name)
    made = random_models(tmp_path / "bundle", tmp_path / "random")
    assert made == {
        "sentiment": [f"task.model={tmp_path / 'random' / 'minilm'}"],
        "math": [f"task.model={tmp_path / 'random' / 'smollm2'}"],
    }
    classifier, head = load_classifier(str(tmp_path / "random" / "minilm"), 2, seed=0)
    assert head and sum(p.numel() for p in classifier.parameters()) > 0
    assert sum(p.numel() for p in load_causal_lm(str(tmp_path / "random" / "smollm2")).parameters())
