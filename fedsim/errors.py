"""Errors fedsim reports to the user without a traceback."""


class ConfigError(ValueError):
    """A configuration value that fedsim cannot run with.

    The message names the key, the value and what is allowed, on one line; the command line
    prints it and exits with status 2.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)}: {allowed}")


class ComponentError(ConfigError):
    """A library class (a partitioner, an optimizer) refused the settings of a config group."""

    def __init__(self, group: str, target: str, reason: str) -> None:
        self.key, self.value, self.allowed = group, target, reason
        ValueError.__init__(self, f"{group} ({target}) rejected its settings: {reason}")


class ConfigCompositionError(ValueError):
    """Hydra could not compose the configuration (unknown option, bad override syntax)."""


def _show(value: object) -> str:
    if isinstance(value, str):
        return value if value else "''"
    return repr(value) if not isinstance(value, (int, float, bool)) or value is None else str(value)


class RunFailed(RuntimeError):
    """The run ended without a usable result (its summary.json says why)."""
