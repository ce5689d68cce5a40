"""The "allowed values" of a refusal, computed from the options' classes (a new strategy or
compressor appears in every hint with no edit)."""

from __future__ import annotations

from fedsim import registry


def strategies_where(test) -> str:
    """fedsim's strategies whose class passes ``test``: ``fedavg, fedsb or ffa``."""
    found = registry.options_where("strategy", lambda cls: cls is not None and test(cls))
    return listed(found)


def compressors_with(group: str, flag: str, plain: str | None = None) -> str:
    """The options of a compressor group that have ``flag`` (``contractive``...) as they are,
    then those that have it with the setting their class names (``contractive_when``), then
    ``plain`` (an option that sends everything as it is)."""
    from fedsim.build import build

    found, conditional = [], []
    for option in registry.options(group):
        compressor = build(group, registry.option_node(group, option))
        if getattr(compressor, flag) and compressor.active:
            found.append(option)
        elif getattr(compressor, "contractive_when", None):
            conditional.append(f"{option} with {compressor.contractive_when}")
    return listed([*found, *conditional, *([plain] if plain else [])])


def listed(items: list[str]) -> str:
    """``a or b``; ``a, b or c``; with a comma before ``or`` when an item is qualified
    (``topk, or randk with scaled=false``)."""
    if len(items) > 1 and any(" " in item for item in items):
        return ", ".join(items[:-1]) + ", or " + items[-1]
    return registry.either(items)
