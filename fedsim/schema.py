"""The schema of every config group: the typed signature of the class an option names.

Each option of a group (``conf/<group>/<option>.yaml``) names a class or function with
``_target_``; its keys are that callable's parameters, and the parameters' annotations are the
keys' types. Before anything is built, :func:`check_node` refuses a key the callable does not
take and a value whose type its annotation does not admit, in one line naming the key, the
value and what is allowed; the class's constructor then checks ranges and combinations
(``fedsim.validate``). The ``sim`` block and the top-level keys are checked by
``fedsim.config.validate``. ``python -m fedsim.schema`` prints the whole schema (it is
``docs/config.md``'s reference section).
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError
from fedsim.registry import PRESETS, conf_folder, option_keys
from fedsim.validate import is_int

__all__ = ["admits", "check_node", "conf_folder", "describe", "parameters", "reference"]

_LISTS = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable)
_MAPPINGS = (dict, collections.abc.Mapping)


def _chain(obj: Any) -> list[Any]:
    """The callables whose parameters a target takes: a class's ``__init__``, and while it
    passes ``**kwargs`` on, its base classes' too (a task that extends another)."""
    if not inspect.isclass(obj):
        return [obj]
    out = []
    for cls in obj.__mro__:
        init = cls.__dict__.get("__init__")
        if cls is object:  # a class without an __init__ of its own takes no keys
            break
        if init is None:
            continue
        out.append(init)
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            break
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return out


def parameters(obj: Any) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters of a config target (None: it takes ``**kwargs`` that reach no
    named parameter, or it cannot be inspected, so any key may be given)."""
    out: dict[str, inspect.Parameter] = {}
    chain = _chain(obj)
    for i, fn in enumerate(chain):
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None
        named = {
            n: p
            for n, p in sig.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"
        }
        out = {**named, **out}
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()) and i == len(chain) - 1:
            return None
    return out


def type_hints(obj: Any) -> dict[str, Any]:
    """The parameters' annotations, evaluated (none for a callable whose cannot be)."""
    out: dict[str, Any] = {}
    for fn in _chain(obj):
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # an annotation naming something not importable here
            continue
        out = {**{k: v for k, v in hints.items() if k != "return"}, **out}
    return out


def admits(hint: Any, value: Any) -> bool:
    """Whether a config value (YAML: null, bool, int, float, str, list, mapping) fits ``hint``.
    Types a YAML value cannot be (tensors, arrays, classes) are not checked."""
    if hint is Any or hint is object:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(admits(a, value) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_int(value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if inspect.isclass(base) and issubclass(base, _MAPPINGS):
        return isinstance(value, dict)
    if inspect.isclass(base) and issubclass(base, _LISTS) and base is not str:
        if not isinstance(value, list):
            return False
        if base in (tuple,) or not args or len(args) != 1:
            return True
        return all(admits(args[0], v) for v in value)
    return True


def describe(hint: Any) -> str:
    """A type as the error messages and the docs say it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        names = []
        for a in args:
            name = describe(a)
            if name not in names:
                names.append(name)
        return " or ".join(names)
    if origin is typing.Literal:
        return " or ".join(str(a) for a in args)
    simple = {type(None): "null", bool: "true or false", int: "an integer", str: "a string"}
    if hint in simple:
        return simple[hint]
    if hint is float:
        return "a number"
    base = origin or hint
    if inspect.isclass(base) and issubclass(base, _MAPPINGS):
        return "a mapping"
    if inspect.isclass(base) and issubclass(base, _LISTS) and base is not str:
        return f"a list of {_plural(describe(args[0]))}" if len(args) == 1 else "a list"
    return "any value"


def _plural(name: str) -> str:
    words = {"an integer": "integers", "a number": "numbers", "a string": "strings"}
    return " or ".join(words.get(part, part) for part in name.split(" or "))


def check_node(group: str, obj: Any, node: dict[str, Any]) -> None:
    """Refuse unknown keys and values of the wrong type for ``obj`` (one-line ConfigError)."""
    params = parameters(obj)
    if params is not None:
        for key in node:
            if not key.startswith("_") and key not in params:
                allowed = ", ".join(sorted(params)) or "(none)"
                raise ConfigError(f"{group}.{key}", node[key], f"unknown key; allowed: {allowed}")
    hints = type_hints(obj)
    for key, value in node.items():
        if key.startswith("_") or key not in hints:
            continue
        if not admits(hints[key], value):
            raise ConfigError(f"{group}.{key}", value, f"must be {describe(hints[key])}")


def reference(conf: Path) -> str:
    """The schema of every group of ``conf`` as Markdown: each option, the class it builds,
    and its keys with their types and the option's values."""
    import yaml
    from hydra.utils import get_object

    lines = []
    for group_dir in sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if group_dir.name in PRESETS:
            continue
        lines += [f"### `{group_dir.name}`", ""]
        for path in sorted(group_dir.glob("*.yaml")):
            node = option_keys(path)
            target = node.get("_target_")
            if not isinstance(target, str):
                continue
            try:
                obj = get_object(target)
            except Exception:
                continue
            hints = type_hints(obj)
            keys = []
            for key, value in node.items():
                if key.startswith("_"):
                    continue
                kind = describe(hints[key]) if key in hints else "any value"
                shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
                shown = shown.removesuffix("...").strip()
                keys.append(f"`{key}` ({kind}) = `{shown}`")
            lines.append(f"- `{path.stem}`: `{target}`" + (": " + "; ".join(keys) if keys else ""))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(conf_folder()), end="")
