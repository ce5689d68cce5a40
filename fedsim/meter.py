"""Progress within a round: the training loops and the in-process grids report here, and the
terminal's progress line (:class:`fedsim.progress.RoundPrinter`) listens.

Nothing here changes what is computed: with no listener (another process, a test, ``quiet``)
every call is a no-op. The module imports nothing, so that the training loops can call it.
"""

from __future__ import annotations

from collections.abc import Callable

#: the listener: ``(kind, count)`` with kind ``"steps"`` (local optimizer steps done, of all
#: the clients trained at once), ``"client"`` (a client's reply is in) or ``"examples"``
#: (examples evaluated); None: nobody listens
_listener: Callable[[str, int], None] | None = None


def listen(listener: Callable[[str, int], None] | None) -> None:
    """Set (or, with None, remove) the process's listener."""
    global _listener
    _listener = listener


def steps(count: int = 1) -> None:
    """``count`` local optimizer steps are done (a batched group reports one per client)."""
    if _listener is not None:
        _listener("steps", count)


def examples(count: int) -> None:
    """``count`` examples are evaluated."""
    if _listener is not None:
        _listener("examples", count)


def client_done(count: int = 1) -> None:
    """``count`` clients' replies are in."""
    if _listener is not None:
        _listener("client", count)
