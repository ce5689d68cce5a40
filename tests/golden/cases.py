"""The golden corpus: configurations whose results must not change when the code is reshaped.

Each case is a run (its ``metrics.jsonl`` and ``summary.json`` without timing fields, and the
SHA-256 of its exported adapter) or a configuration error (exit status and the one line on
stderr). ``tests/test_golden.py`` reruns every case and requires the stored files exactly.

Regenerate the files (only in a commit that changes results on purpose, and say so in it)::

    .venv/bin/python -m tests.golden.cases --write          # every case
    .venv/bin/python -m tests.golden.cases --write fedex    # some cases

Bit-identical floats are only defined on one numeric platform: ``platform.json`` holds a
fingerprint of this machine's float kernels (torch and numpy). Where the fingerprint differs
(another CPU or library build), the test still compares everything but floats exactly, and
floats to a relative 1e-4.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUT = "stopped"  # a resume case's stopped run folder, inside its golden folder
TIMING = ("round_time_s", "eval_time_s", "wall_time_s", "write_time_s")
#: fields that describe the software or the machine, not the result
UNSTABLE = ("versions", "device", "device_name")
#: the checkpoint's size varies with the digits of the wall time it records
SIZES = ("bytes",)

# The tiny synthetic setting of tests/conftest.py (4 clients, 2 rounds, 3 local steps), written
# out here on purpose rather than imported: the corpus must not move when test helpers change.
BASE = [
    "task=synthetic",
    "task.examples_per_client=64",
    "task.test_examples=200",
    "task.hidden_dim=32",
    "sim.num_clients=4",
    "sim.clients_per_round=4",
    "sim.rounds=2",
    "sim.local_steps=3",
    "sim.batch_size=16",
    "sim.lr=0.01",
    "sim.eval_clients=all",
    "quiet=true",
]
#: partial participation over more rounds: catch-up, error-feedback memories, EF21-P
PARTIAL = ["sim.num_clients=6", "sim.clients_per_round=2", "sim.rounds=4"]

#: name -> what to run. ``overrides`` go after BASE (``base: false``: instead of it); ``text``:
#: the tiny BERT of tests/tiny_text.py; ``plugin``: examples/custom_aggregator on the path;
#: ``error``: a configuration mistake run through the command line.
CASES: dict[str, dict[str, Any]] = {
    # ---- strategies and adapters (and LoRA-SB's three initialisations)
    "fedavg": {"overrides": ["strategy=fedavg"]},
    "fedavg_unweighted_pathological": {
        "overrides": [
            "strategy=fedavg",
            "strategy.weighted=false",
            "partition=pathological",
            "task.client_shift=1",
        ]
    },
    "fedsb_server_init": {"overrides": ["strategy=fedsb", "adapter=lora_sb", *PARTIAL]},
    "fedsb_clients_init": {
        "overrides": ["strategy=fedsb", "adapter=lora_sb", "adapter.init.source=clients"]
    },
    "fedsb_random_init": {
        "overrides": ["strategy=fedsb", "adapter=lora_sb", "adapter.init.method=random"]
    },
    "ffa": {"overrides": ["strategy=ffa", "adapter=ffa", "partition=iid"]},
    "fedex_partial": {"overrides": ["strategy=fedex", *PARTIAL]},
    "flora_ranks_partial": {
        "overrides": ["strategy=flora", "adapter.client_ranks=[2,4,8]", *PARTIAL]
    },
    "fedsa": {"overrides": ["strategy=fedsa", "sim.validation_fraction=0.25"]},
    "local_lora_sb": {"overrides": ["strategy=local", "adapter=lora_sb"]},
    "centralized": {"overrides": ["strategy=centralized"]},
    "plugin_trimmed_mean": {"overrides": ["strategy=trimmed_mean"], "plugin": True},
    # ---- compression and error feedback (uplink), EF21-P (downlink)
    "topk_naive": {"overrides": ["strategy=fedavg", "compressor=topk", "compressor.ratio=0.1"]},
    "randk_ef14": {
        "overrides": [
            "strategy=fedavg",
            "compressor=randk",
            "compressor.scaled=false",
            "feedback=ef14",
            *PARTIAL,
        ]
    },
    "qsgd_fedsb": {
        "overrides": ["strategy=fedsb", "adapter=lora_sb", "compressor=qsgd", "compressor.bits=4"]
    },
    "compeft_partial": {"overrides": ["strategy=fedavg", "compressor=compeft", *PARTIAL]},
    "topk_ef21_partial": {
        "overrides": ["strategy=fedavg", "compressor=topk", "feedback=ef21", *PARTIAL]
    },
    "topk_econtrol_flat": {
        "overrides": [
            "strategy=ffa",
            "adapter=ffa",
            "compressor=topk",
            "compressor.scope=flat",
            "feedback=econtrol",
            "feedback.compress_first=true",
            "feedback.eta=0.1",
            *PARTIAL,
        ]
    },
    "downlink_topk_ef21": {
        "overrides": [
            "strategy=fedavg",
            "compressor=topk",
            "feedback=ef21",
            "downlink=topk",
            "downlink.ratio=0.2",
            *PARTIAL,
        ]
    },
    "downlink_randk_fedsb": {
        "overrides": [
            "strategy=fedsb",
            "adapter=lora_sb",
            "downlink=randk",
            "downlink.scaled=false",
            *PARTIAL,
        ]
    },
    "flora_topk_partial": {
        "overrides": ["strategy=flora", "compressor=topk", "compressor.ratio=0.2", *PARTIAL]
    },
    "fedsa_topk_ef21": {
        "overrides": ["strategy=fedsa", "compressor=topk", "feedback=ef21", *PARTIAL]
    },
    # ---- differential privacy
    "dpsgd_fedsb": {
        "overrides": ["strategy=fedsb", "adapter=lora_sb", "privacy=dpsgd", "privacy.clip_norm=0.5"]
    },
    "dpsgd_clients_init_noise": {
        "overrides": [
            "strategy=fedavg",
            "adapter=lora_sb",
            "adapter.init.source=clients",
            "privacy=dpsgd",
            "privacy.target_epsilon=null",
            "privacy.noise_multiplier=1.1",
        ]
    },
    "central_fedavg": {
        "overrides": ["strategy=fedavg", "privacy=central", "sim.num_clients=8", "sim.rounds=3"]
    },
    "central_topk_ef21": {
        "overrides": [
            "strategy=fedavg",
            "privacy=central",
            "compressor=topk",
            "feedback=ef21",
            "sim.num_clients=8",
            "sim.rounds=3",
        ]
    },
    "central_topk_naive": {
        "overrides": [
            "strategy=fedavg",
            "privacy=central",
            "compressor=topk",
            "compressor.ratio=0.2",
            "sim.num_clients=8",
            "sim.rounds=3",
        ]
    },
    "central_ef14_downlink": {
        "overrides": [
            "strategy=ffa",
            "adapter=ffa",
            "privacy=central",
            "compressor=topk",
            "feedback=ef14",
            "downlink=topk",
            "sim.num_clients=8",
            "sim.rounds=3",
        ]
    },
    "central_downlink_dense": {
        "overrides": [
            "strategy=fedavg",
            "privacy=central",
            "downlink=randk",
            "sim.num_clients=8",
            "sim.rounds=3",
        ]
    },
    "central_fedsb_clients_init": {
        "overrides": [
            "strategy=fedsb",
            "adapter=lora_sb",
            "adapter.init.source=clients",
            "privacy=central",
            "sim.num_clients=8",
            "sim.clients_per_round=4",
        ]
    },
    # ---- faults
    "faults_mixed": {
        "overrides": ["strategy=fedavg", "faults=mixed", "faults.corrupt_prob=0.3", *PARTIAL]
    },
    "faults_crash_skips": {
        "overrides": [
            "strategy=fedavg",
            "faults=crash",
            "faults.crash_prob=0.4",
            "sim.min_clients=3",
            "sim.rounds=4",
        ]
    },
    "faults_corrupt_ef21": {
        "overrides": [
            "strategy=fedavg",
            "compressor=topk",
            "feedback=ef21",
            "faults=corrupt",
            "faults.corrupt_prob=0.4",
            *PARTIAL,
        ]
    },
    "faults_stragglers_fedex": {
        "overrides": [
            "strategy=fedex",
            "faults=stragglers",
            "faults.straggler_prob=0.5",
            "faults.deadline=5",
            *PARTIAL,
        ]
    },
    # ---- optimisers and schedules
    "sgd_linear_warmup": {
        "overrides": [
            "strategy=fedavg",
            "optimizer=sgd",
            "optimizer.momentum=0.9",
            "schedule=linear",
            "schedule.warmup_steps=2",
        ]
    },
    "cosine_keep_optimizer": {
        "overrides": [
            "strategy=fedavg",
            "schedule=cosine",
            "sim.keep_optimizer_state=true",
            "sim.eval_clients=2",
            *PARTIAL,
        ]
    },
    # ---- the batched engine
    "batched_fedavg_ef21": {
        "overrides": [
            "strategy=fedavg",
            "engine=batched",
            "engine.group_size=3",
            "compressor=topk",
            "feedback=ef21",
            *PARTIAL,
        ]
    },
    "batched_fedex_dpsgd": {
        "overrides": ["strategy=fedex", "engine=batched", "privacy=dpsgd", "adapter.dropout=0.2"]
    },
    "batched_fedsb_faults": {
        "overrides": [
            "strategy=fedsb",
            "adapter=lora_sb",
            "engine=batched",
            "faults=mixed",
            *PARTIAL,
        ]
    },
    # ---- a text task (tiny BERT, its own dropout) for one round, on both engines
    "text_fedavg": {
        "text": True,
        "overrides": ["strategy=fedavg", "sim.rounds=1", "sim.local_steps=2"],
    },
    "text_fedsb_batched": {
        "text": True,
        "overrides": [
            "strategy=fedsb",
            "adapter=lora_sb",
            "engine=batched",
            "sim.rounds=1",
            "sim.local_steps=2",
        ],
    },
    # ---- resumed from a checkpoint stored in the corpus (written after round 2 by the code that
    # made the corpus): every kind of server and client state must be read back the same
    "resume_downlink_topk_ef21": {
        "resume_after": 2,
        "overrides": [
            "strategy=fedavg",
            "compressor=topk",
            "feedback=ef21",
            "downlink=topk",
            "downlink.ratio=0.2",
            "privacy=dpsgd",
            *PARTIAL,
        ],
    },
    "resume_fedex_stragglers": {
        "resume_after": 2,
        "overrides": [
            "strategy=fedex",
            "faults=stragglers",
            "faults.straggler_prob=0.5",
            "faults.deadline=5",
            "sim.keep_optimizer_state=true",
            *PARTIAL,
        ],
    },
    "resume_central_fedsb": {
        "resume_after": 1,
        "overrides": [
            "strategy=fedsb",
            "adapter=lora_sb",
            "adapter.init.source=clients",
            "privacy=central",
            "sim.num_clients=8",
            "sim.clients_per_round=4",
            "sim.rounds=3",
        ],
    },
    # ---- configuration mistakes: one line, exit status 2
    "error_bad_lr": {"error": True, "overrides": ["sim.lr=-1"]},
    "error_unknown_strategy": {"error": True, "overrides": ["strategy=nope"]},
    "error_ef_without_contractive": {
        "error": True,
        "overrides": ["strategy=fedavg", "compressor=qsgd", "feedback=ef14"],
    },
    "error_flora_too_big_rank": {
        "error": True,
        "overrides": ["strategy=flora", "adapter.client_ranks=[16]", "adapter.r=8"],
    },
    "error_unknown_sim_key": {"error": True, "overrides": ["sim.rounds_per_day=3"]},
}


# ----------------------------------------------------------------------------- running


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def _text_overrides(scratch: Path) -> list[str]:
    from tests.tiny_text import hf_overrides

    return hf_overrides(scratch / "hf")


def overrides_of(name: str, scratch: Path) -> list[str]:
    case = CASES[name]
    text = _text_overrides(scratch) if case.get("text") else []
    base = [o for o in BASE if not o.startswith("task")] if text else BASE
    return [*base, *text, *case["overrides"]]


def _stable(value: Any, within: str = "") -> Any:
    """``value`` without timing and software-version fields (recursively)."""
    if isinstance(value, dict):
        return {
            k: _stable(v, k)
            for k, v in value.items()
            if k not in TIMING and k not in UNSTABLE and not (within == "checkpoint" and k in SIZES)
        }
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=1, sort_keys=True, allow_nan=True) + "\n"


def produce(name: str) -> dict[str, str]:
    """Run one case in a scratch folder; returns its golden files (name -> text)."""
    import os

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    case = CASES[name]
    scratch = Path(tempfile.mkdtemp(prefix=f"fedsim-golden-{name}-"))
    try:
        overrides = overrides_of(name, scratch)
        if case.get("error"):
            return {"error.json": _dumps(_error(overrides))}
        from fedsim.api import run
        from fedsim.results import read_metrics

        out = scratch / "run"
        extra: dict[str, Any] = {}
        if case.get("resume_after"):
            shutil.copytree(HERE / name / CUT, out)
        try:
            if case.get("resume_after"):
                run(overrides, output_dir=out, resume=True)
            elif case.get("plugin"):
                example = ROOT / "examples" / "custom_aggregator"
                with _on_path(example):
                    run(overrides, output_dir=out, config_dir=str(example / "conf"))
            else:
                run(overrides, output_dir=out)
        except Exception as e:  # a failed run is a result too (its summary says why)
            extra["raised"] = f"{type(e).__name__}: {e}"
        rows = read_metrics(out)
        summary = json.loads((out / "summary.json").read_text())
        weights = out / "adapter" / "adapter_model.safetensors"
        extra["adapter_sha256"] = (
            hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else None
        )
        text = "".join(json.dumps(_stable(r), sort_keys=True) + "\n" for r in rows)
        files = {
            "metrics.jsonl": text,
            "summary.json": _dumps(_stable(summary)),
            "extra.json": _dumps(extra),
        }
        return {k: v.replace(str(scratch), "<scratch>") for k, v in files.items()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Killed(BaseException):
    """Stops a run as a kill would: no ``except Exception`` sees it, no summary is written."""


def cut(name: str) -> None:
    """Write the stopped run a ``resume_after`` case continues: the run folder as a kill right
    after round ``resume_after``'s checkpoint leaves it."""
    import fedsim.checkpoint as checkpoint
    from fedsim.api import run

    at = CASES[name]["resume_after"]
    target = HERE / name / CUT
    shutil.rmtree(target, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"fedsim-golden-{name}-"))
    original = checkpoint.save

    def save_then_die(path, tree):
        size = original(path, tree)
        if tree["round"] == at:
            raise _Killed(at)
        return size

    checkpoint.save = save_then_die
    try:
        run(overrides_of(name, scratch), output_dir=scratch / "run")
    except _Killed:
        pass
    finally:
        checkpoint.save = original
    try:
        target.mkdir(parents=True)
        for file in ("config.yaml", "metrics.jsonl", checkpoint.CHECKPOINT_FILE):
            shutil.copy(scratch / "run" / file, target / file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _error(overrides: list[str]) -> dict[str, Any]:
    from fedsim.cli import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*overrides, "hydra.run.dir=/nonexistent/never-written"])
        except SystemExit as e:
            code = e.code
    return {"exit": code, "stderr": err.getvalue().strip().splitlines()}


# ----------------------------------------------------------------------------- platform


def fingerprint() -> str:
    """A hash of float results from the kernels fedsim's runs use (matrix products, the
    nonlinearities, softmax and cross-entropy, AdamW, the SVD and QR), on this machine."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    parts = []
    with torch.no_grad():
        x = torch.randn(67, 45)
        w = torch.randn(45, 33, requires_grad=False)
        h = torch.tanh(x @ w) + torch.nn.functional.gelu(x @ w) + torch.relu(x @ w)
        parts += [h, torch.log_softmax(h, -1), torch.nn.functional.layer_norm(h, (33,))]
        parts.append(torch.linalg.qr(torch.randn(45, 8))[0])
    lin = torch.nn.Linear(33, 5)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.01)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(lin(h), torch.arange(67) % 5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    parts += [p.detach() for p in lin.parameters()]
    rng = np.random.default_rng(0)
    u, s, vt = np.linalg.svd(np.sign(rng.normal(size=(45, 33))), full_matrices=False)
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p.numpy().tobytes())
    for a in (np.abs(u), s, np.abs(vt), np.exp(rng.normal(size=100))):
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


#: floats this small are rounding-error diagnostics (an export's or an exact aggregate's
#: relative error, ~1e-8 in float32, ~1e-16 in float64): their value is the platform's
#: rounding, so on another platform only "both at rounding level" is compared
ROUNDING = 1e-6
#: fields that hash float bytes: equal only on the same platform (their content is covered
#: by the metrics and summary compared up to rounding)
BYTE_HASHES = ("adapter_sha256",)


def same_up_to_floats(got: Any, want: Any, rtol: float = 1e-4) -> bool:
    """Everything but floats and byte hashes equal; floats within ``rtol``, or both below
    ``ROUNDING`` in magnitude; a byte hash present where it is (another numeric platform)."""
    if isinstance(want, float) and isinstance(got, (int, float)):
        if math.isnan(want):
            return isinstance(got, float) and math.isnan(got)
        if abs(want) < ROUNDING and abs(got) < ROUNDING:
            return True
        return math.isclose(got, want, rel_tol=rtol, abs_tol=1e-12)
    if isinstance(want, dict) and isinstance(got, dict):
        return set(got) == set(want) and all(
            (got[k] is None) == (want[k] is None)
            if k in BYTE_HASHES
            else same_up_to_floats(got[k], want[k], rtol)
            for k in want
        )
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(
            same_up_to_floats(g, w, rtol) for g, w in zip(got, want)
        )
    return got == want


def write(names: list[str]) -> None:
    (HERE / "platform.json").write_text(_dumps({"fingerprint": fingerprint()}))
    for name in names:
        folder = HERE / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        if CASES[name].get("resume_after"):
            cut(name)
        for file, text in produce(name).items():
            (folder / file).write_text(text)
        print(f"wrote {folder.relative_to(ROOT)}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "--write":
        sys.exit("usage: python -m tests.golden.cases --write [case ...]")
    chosen = args[1:] or list(CASES)
    unknown = [n for n in chosen if n not in CASES]
    if unknown:
        sys.exit(f"unknown cases {unknown}; the cases are {', '.join(CASES)}")
    write(chosen)
