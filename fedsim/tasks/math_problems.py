"""Mathematics problems from DeepMind's ``mathematics_dataset``, generated offline.

:func:`math_problems` draws distinct question / answer pairs from the dataset's modules
(``arithmetic__mul``, ``algebra__linear_1d``, ...) at a difficulty, seeded, and caches them as
JSONL under ``$FEDSIM_CACHE/math``; :func:`check_modules` refuses a module that does not exist
or does not run with the installed numpy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
from collections.abc import Iterator, Sequence

import numpy as np

from fedsim.errors import ConfigError
from fedsim.tasks.corpora import _version, cache_dir, missing_package

#: modules that generate with current numpy and sympy, short answers, a mix of skills
DEFAULT_MODULES = (
    "arithmetic__add_or_sub",
    "arithmetic__add_sub_multiple",
    "arithmetic__mul",
    "algebra__linear_1d",
    "numbers__place_value",
    "comparison__pair",
)

#: ``task.difficulty``: a third of each module's entropy range (the dataset's train-easy /
#: train-medium / train-hard), or the whole range
DIFFICULTIES = {"easy": (0, 3), "medium": (1, 3), "hard": (2, 3), "any": (0, 1)}

#: bump when the cached problem format changes
PROBLEM_CACHE_VERSION = 1


def _math_modules() -> dict[str, object]:
    """mathematics_dataset's module registry, importable with current sympy (a shim)."""
    if importlib.util.find_spec("mathematics_dataset") is None:
        raise missing_package("mathematics_dataset")
    # sympy >= 1.7 moved base_solution_linear into a submodule; the dataset imports it from the
    # package (importlib: the package attribute `diophantine` is a function, not the module)
    package = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(package, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        package.base_solution_linear = inner.base_solution_linear
    from mathematics_dataset.modules import modules

    _tame_absl()
    return modules


def _tame_absl() -> None:
    """absl (imported by mathematics_dataset) binds its log handler to whatever ``sys.stderr``
    was at import (a notebook's or a test's captured stream) and closes that stream when Hydra
    reconfigures logging; bind it to the process's own stderr, which it never closes."""
    import sys

    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}__{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global ``random`` and ``numpy.random`` states (which mathematics_dataset draws from)
    seeded, and restored afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def module_registry(difficulty: str) -> dict[str, object]:
    """mathematics_dataset's problem generators by name (``arithmetic__mul``) at
    ``difficulty``."""
    if difficulty not in DIFFICULTIES:
        allowed = ", ".join(DIFFICULTIES)
        raise ConfigError("task.difficulty", difficulty, f"must be one of {allowed}")
    level, levels = DIFFICULTIES[difficulty]

    def entropy(range_):
        lo, hi = range_
        return lo + level / levels * (hi - lo), lo + (level + 1) / levels * (hi - lo)

    return _flatten(_math_modules().train(entropy))


def check_modules(modules: Sequence[str], difficulty: str) -> dict[str, object]:
    """The generators of ``modules``; a ConfigError naming any that does not exist."""
    if isinstance(modules, str) or not modules:
        raise ConfigError("task.modules", modules, "give a list of mathematics_dataset modules")
    registry = module_registry(difficulty)
    for name in modules:
        if name not in registry:
            choices = ", ".join(sorted(registry))
            raise ConfigError("task.modules", name, f"is not a module; choose from {choices}")
    chosen = {name: registry[name] for name in modules}
    with _seeded(0):  # one problem each: a module broken by today's numpy fails here
        for name, generator in chosen.items():
            _sample(name, generator)
    return chosen


def _sample(name: str, generator):
    try:
        return generator()
    except (AttributeError, TypeError) as e:  # APIs that numpy 2 removed (np.object, itemset)
        raise ConfigError(
            "task.modules",
            name,
            f"does not run with numpy {np.__version__} ({e}); task=math's default modules do",
        ) from None


def math_problems(
    modules: Sequence[str], difficulty: str, count: int, seed: int
) -> tuple[list[str], list[str], list[int]]:
    """``count`` distinct problems (questions, answers, module index), as evenly as possible
    over ``modules`` in turn; seeded and cached as JSONL under ``$FEDSIM_CACHE/math``."""
    modules = list(modules) if not isinstance(modules, str) else modules
    flat = check_modules(modules, difficulty)
    import sympy
    from mathematics_dataset import generate_settings

    key = [PROBLEM_CACHE_VERSION, modules, difficulty, count, seed, _version("mathematics_dataset")]
    key.append(sympy.__version__)
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]
    path = cache_dir() / "math" / f"{digest}.jsonl"
    if path.exists():
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line]
            if len(rows) == count:
                return [r["q"] for r in rows], [r["a"] for r in rows], [r["m"] for r in rows]
        except (OSError, ValueError, KeyError):  # a damaged cache file is rebuilt
            pass
    per_module = math.ceil(count / len(modules))
    seen: set[str] = set()
    rows = []
    with _seeded(seed):
        for m, name in enumerate(modules):
            made, tries = 0, 0
            while made < per_module:
                tries += 1
                if tries > 50 * per_module:
                    raise ConfigError(
                        "task.examples",
                        count,
                        f"module {name} gave only {made} distinct problems at difficulty "
                        f"{difficulty} (asked {per_module})",
                    )
                problem = _sample(name, flat[name])
                q, a = str(problem.question), str(problem.answer)
                if len(q) > generate_settings.MAX_QUESTION_LENGTH or q in seen:
                    continue
                if len(a) > generate_settings.MAX_ANSWER_LENGTH:
                    continue
                seen.add(q)
                rows.append((made, m, {"q": q, "a": a, "m": m}))
                made += 1
    # the modules interleaved, then cut to count: each module within one problem of the others
    rows = [row for _, _, row in sorted(rows, key=lambda r: r[:2])][:count]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    except OSError:
        pass
    return [r["q"] for r in rows], [r["a"] for r in rows], [r["m"] for r in rows]
