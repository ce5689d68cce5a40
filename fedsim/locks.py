"""One run per folder: an exclusive lock on a run's (or a sweep's) folder while it runs.

The lock is ``flock`` on the folder itself (no lock file is written): the kernel drops it when
the process ends, however it ends, so a killed run never leaves a stale lock. ``fedsim`` takes
it before anything is written into the folder (Hydra's ``.hydra/`` record included) and holds
it until the process exits; a second run into the same folder, or a resume of a folder whose
run is still going, is refused with one line. A process holds each folder once (the command
line's lock covers the run it starts in the same process). Where ``fcntl`` does not exist
(Windows) folders are not locked.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedsim.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_held: dict[str, int] = {}


def hold(folder: Path | str, key: str) -> bool:
    """Lock ``folder`` (created if missing) for this process; a ConfigError naming ``key`` if
    another process holds it. Returns False if this process held it already."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(folder)
    if real in _held or fcntl is None:
        return False
    fd = os.open(real, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ConfigError(
            key,
            str(folder),
            "another fedsim run is using this folder (one run per folder); wait for it to "
            "end or choose another folder",
        ) from None
    _held[real] = fd
    return True


def free(folder: Path | str) -> None:
    """Release this process's lock on ``folder`` (nothing if it holds none)."""
    fd = _held.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def free_all() -> None:
    for real in list(_held):
        free(real)
