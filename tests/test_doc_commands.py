"""Every fenced ``fedsim`` command of README.md and docs/*.md is valid, and a few of them run.

Each command of a fenced shell block (``fedsim ...``, ``python -m fedsim ...``, sweeps with
``-m``; line continuations joined, comments dropped, ``$ `` prompts stripped, the block's shell
variables and the first value of its ``for`` loops substituted) goes through the validation the
``fedsim`` command runs before anything starts: ``fedsim.cli.prevalidate`` composes every job,
checks it and builds its components and model (nothing is trained). Only the output folder is
moved to a temporary one. A sweep is checked on a covering subset of its jobs (every value of
every swept key in at least one job; the first job, which also fixes the config's own sweep,
is the command's first), so that the 75 jobs of ``+sweep=tune_lr`` cost five.

The commands of ``RUN`` (the synthetic task) also run, each in a subprocess, as written plus
``sim.rounds=1 sim.local_steps=2`` (their size only) and an output folder in a temporary
directory, one after another beside the checks. ``SKIP`` lists, by command prefix, what cannot
be validated offline, each with its reason; ``LIGHT`` what is checked without loading its model
or data. A ``SKIP`` or ``LIGHT`` prefix that no longer matches a command fails, as does a
``RUN`` command that is no longer in the docs. Test ids are ``file:line``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: command prefix -> why it is not validated here
SKIP = {
    "fedsim (CLI, Hydra)": "a diagram of the call path in docs/architecture.md, not a command",
    "fedsim resume=results/": "continues a stopped run from its folder, which needs that folder "
    "(tests/test_checkpoint.py resumes real ones)",
    "fedsim task=synthetic engine=ray engine.address=auto": "attaches to a running Ray cluster: "
    "fedsim checks the address up front (tests/test_scale_out.py, opt-in)",
    "fedsim task=sentiment engine=ray engine.address=<head host>": "a placeholder for a Ray "
    "cluster's address",
    "fedsim task=hf task.model=/models/roberta-base": "placeholders: a local model folder and "
    "local data files",
    "fedsim --config-dir my_conf strategy=my_aggregator": "placeholders: the reader's plug-in "
    "module and config folder (tests/test_plugins.py runs examples/custom_aggregator)",
}

#: command prefix -> why it is checked without its model or data: every job is composed and
#: every key and option checked (each component built but the task, whose keys are checked
#: against its class), but no model is loaded and no data partitioned
LIGHT = {
    "fedsim task=math": "the task loads SmolLM2-135M when built: 10 to 70 s on a 2-core CPU",
}

#: commands that leave the task to conf/config.yaml's default (sentiment) on purpose; every
#: other command names its task: ``task=...``, or a preset that pins one (``override /task``)
DEFAULT_TASK = {
    "fedsim": "the demo run, whose time (3.6 minutes on 2 cores) README.md states",
    "fedsim --cfg job": "prints the composed configuration; nothing runs",
}

#: commands that also run (synthetic task, seconds each)
RUN = [
    "fedsim task=synthetic sim.rounds=20 sim.lr=0.005 adapter.r=4",
    "fedsim -m task=synthetic sim.num_clients=10,50 adapter.r=4,8",
    "fedsim task=synthetic compressor=topk compressor.ratio=0.01 feedback=ef21",
    "fedsim task=synthetic privacy=dpsgd privacy.target_epsilon=3 strategy=fedsb",
    "fedsim task=synthetic strategy=fedavg system=mobile sim.async_buffer=5 sim.concurrency=10",
]
#: what a run of a RUN command changes: its size only
SIZE = ["sim.rounds=1", "sim.local_steps=2"]

_SHELLS = {"", "bash", "sh", "shell", "console", "zsh"}
_PROG = re.compile(r"(?<![\w./-])(python3? -m fedsim|fedsim)(?=\s|$)")
_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_ASSIGN = re.compile(r"[A-Za-z_]\w*=")
# flags that take the next argument as their value
_FLAG_VALUES = {"--cfg", "-c", "--info", "-i", "--config-dir", "-cd", "--config-name", "-cn"}


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    prog: str  # fedsim or python -m fedsim
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join([self.prog, *self.argv])


def _logical_lines(lines: list[str], start: int):
    """(line number, text) of a block's lines, continuations joined."""
    i = start
    while i < len(lines) and not lines[i].lstrip().startswith(("```", "~~~")):
        number, text = i + 1, lines[i].strip()
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        yield number, text.removeprefix("$ ")
        i += 1


def _statements(text: str) -> list[str]:
    """The line without its comment, split at unquoted ``;`` and ``&&``."""
    parts, current, quote, i = [], [], None, 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            break
        elif c == ";" or text.startswith("&&", i):
            parts.append("".join(current))
            current, i = [], i + (2 if c == "&" else 1)
            continue
        current.append(c)
        i += 1
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand(text: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def _commands_of_block(path: Path, lines: list[str], start: int):
    env: dict[str, str] = {}
    for number, line in _logical_lines(lines, start):
        for statement in _statements(line):
            statement = re.sub(r"^(do|then|else)\s+", "", statement)
            match = _PROG.search(statement)
            before = statement[: match.start()] if match else statement
            try:
                words = shlex.split(_expand(before, env))
            except ValueError:  # not shell (a diagram, an apostrophe in prose)
                continue
            if words[:1] == ["for"] and len(words) > 3 and words[2] == "in":
                env[words[1]] = words[3]  # the loop's first value
            elif words and all(_ASSIGN.match(w) for w in words):
                if not match:
                    env.update(w.split("=", 1) for w in words)
            if match and all(_ASSIGN.match(w) for w in words):  # env prefixes are allowed
                argv = shlex.split(_expand(statement[match.end() :], env))
                where = f"{path.relative_to(ROOT)}:{number}"
                yield Command(where, match.group(1), tuple(argv))


def doc_commands() -> list[Command]:
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        inside = False
        for i, line in enumerate(lines):
            fence = line.strip()
            if not fence.startswith(("```", "~~~")):
                continue
            if not inside and fence[3:].strip().lower() in _SHELLS:
                found.extend(_commands_of_block(path, lines, i + 1))
            inside = not inside
    return found


COMMANDS = doc_commands()


def _reason(table: dict[str, str], command: Command) -> str | None:
    return next((why for prefix, why in table.items() if command.text.startswith(prefix)), None)


def _light_check(cfg: dict) -> None:
    """``check`` without the model or the data: the values fedsim reads validated, every group
    built but the task, whose keys and types are checked against its class unbuilt (the math
    task loads its model when built)."""
    from hydra.utils import get_object

    from fedsim import registry
    from fedsim.build import build
    from fedsim.config.checks import validate
    from fedsim.schema import check_node

    validate(cfg)
    for group in registry.GROUPS:
        node = cfg.get(group.name) or {"_target_": group.default}
        if group.name == "task":
            check_node(group.name, get_object(node["_target_"]), node)
        else:
            build(group.name, node)


_COMPOSED: dict = {}


def _cached(compose):
    """``compose_job`` once per distinct command line (the docs repeat some)."""

    def composed(overrides, *args, **kwargs):
        key = (tuple(overrides), args, tuple(sorted(kwargs.items())))
        if key not in _COMPOSED:
            _COMPOSED[key] = compose(overrides, *args, **kwargs)
        return _COMPOSED[key]

    return composed


def _covering(expand):
    """``expand_sweep`` reduced to jobs that take every value of every swept key at least
    once (job i takes value i of each key, cycling), the command's first job first."""

    def covering(overrides, sweeper_params=None):
        jobs = expand(overrides, sweeper_params)
        if len(jobs) < 2:
            return jobs
        axes = [list(dict.fromkeys(job[p] for job in jobs)) for p in range(len(jobs[0]))]
        return [[axis[i % len(axis)] for axis in axes] for i in range(max(map(len, axes)))]

    return covering


def _with_output(argv: list[str], folder: Path) -> list[str]:
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(argv) else "hydra.run.dir"
    return [a for a in argv if a.split("=", 1)[0] != key] + [f"{key}={folder}"]


def test_the_docs_hold_commands_and_every_skip_and_run_names_one():
    texts = [c.text for c in COMMANDS]
    assert len(COMMANDS) > 80, texts
    prefixes = [*SKIP, *LIGHT]
    unused = [p for p in prefixes if not any(t.startswith(p) for t in texts)]
    unused += [d for d in DEFAULT_TASK if d not in texts]
    assert not unused, f"SKIP, LIGHT or DEFAULT_TASK entries that match no command: {unused}"
    missing = [r for r in RUN if r not in texts]
    assert not missing, f"RUN commands no longer in the docs: {missing}"
    unnamed = [c.where for c in COMMANDS if c.text in RUN and "task=synthetic" not in c.argv]
    assert not unnamed, unnamed


def _names_task(command: Command) -> bool:
    for arg in command.argv:
        key, _, value = arg.partition("=")
        if key == "task":
            return True
        preset = ROOT / "conf" / key.removeprefix("+") / f"{value}.yaml"
        if key in ("+experiment", "+sweep") and preset.is_file():
            if "override /task:" in preset.read_text(encoding="utf-8"):
                return True
    return False


def test_every_command_names_its_task():
    """The default task is the sentiment demo (minutes a run): an example that leaves the task
    out runs it, whatever the text around it describes."""
    unnamed = [
        f"{c.where}: {c.text}"
        for c in COMMANDS
        if not _reason(SKIP, c) and c.text not in DEFAULT_TASK and not _names_task(c)
    ]
    assert not unnamed, "name the task (task=synthetic, ...):\n" + "\n".join(unnamed)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    """One output folder for every check (nothing is written; the same command line twice is
    composed once)."""
    return tmp_path_factory.mktemp("doc-commands") / "out"


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_is_valid(command: Command, out_dir, monkeypatch):
    reason = _reason(SKIP, command)
    if reason:
        pytest.skip(reason)
    from fedsim import cli, config

    known = {"-m", "--multirun", *cli._INFO_FLAGS, *cli._VALUE_FLAGS}
    flags = [a.split("=", 1)[0] for a in command.argv if a.startswith("-")]
    assert set(flags) <= known, f"{command.where}: unknown flag in {command.text}"
    monkeypatch.setattr(cli, "expand_sweep", _covering(config.expand_sweep))
    monkeypatch.setattr(cli, "compose_job", _cached(config.compose_job))
    if _reason(LIGHT, command):
        monkeypatch.setattr(cli, "check", _light_check)
    monkeypatch.chdir(ROOT)  # the docs name files relative to the checkout
    argv = _with_output(list(command.argv), out_dir)
    overrides, given, _, info = cli._parse(argv)
    if info:  # fedsim passes these to Hydra: check that its overrides compose
        values = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in _FLAG_VALUES}
        plain = [o for o in overrides if o not in values]
        _cached(config.compose_job)(plain, config_dir=given.get("dir"))
        return
    cli.prevalidate(argv)


def _run(command: Command, folder: Path) -> subprocess.CompletedProcess:
    """The command as written, at the size of ``SIZE``, into ``folder``."""
    sizes = {s.split("=", 1)[0] for s in SIZE}
    argv = _with_output([a for a in command.argv if a.split("=", 1)[0] not in sizes], folder)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *argv, *SIZE],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module", autouse=True)
def runs(request, tmp_path_factory):
    """The selected ``RUN`` commands, started one at a time in a thread while the checks go on
    in this process (each run is a process of its own: on two cores they overlap)."""
    selected = [
        item.callspec.params["text"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_doc_command_runs"
        and item.module.__name__ == __name__
    ]
    by_text = {c.text: c for c in COMMANDS}
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = {}
        for text in selected:
            if text in by_text:
                folder = tmp_path_factory.mktemp("run") / "out"
                futures[text] = (folder, pool.submit(_run, by_text[text], folder))
        yield futures


@pytest.mark.parametrize("text", RUN)
def test_doc_command_runs(text: str, runs):
    from fedsim.config import expand_sweep

    assert text in runs, f"no longer in the docs: {text}"
    command = next(c for c in COMMANDS if c.text == text)
    folder, future = runs[text]
    proc = future.result(timeout=600)
    assert proc.returncode == 0, f"{command.where}: {text}\n{proc.stderr[-3000:]}"
    summaries = sorted(folder.rglob("summary.json"))
    overrides = [a for a in command.argv if not a.startswith("-")]
    jobs = len(expand_sweep(overrides)) if "-m" in command.argv else 1
    assert len(summaries) == jobs, (command.where, summaries)
    for summary in summaries:
        assert json.loads(summary.read_text(encoding="utf-8"))["status"] == "ok", summary
