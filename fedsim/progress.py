"""One line per round on the terminal (rich); with ``quiet=true`` only the closing line."""

from __future__ import annotations

from typing import Any

from rich.console import Console


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def human_seconds(s: float) -> str:
    """Simulated seconds, readable: 12 ms, 4.2 s, 12.5 min, 3.2 h, 2.1 d."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s" if s >= 0.9995 or s == 0 else f"{s * 1e3:.3g} ms"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class RoundPrinter:
    def __init__(self, rounds: int, quiet: bool = False) -> None:
        self.rounds, self.quiet = rounds, quiet
        self.console = Console(highlight=False, soft_wrap=True)

    def header(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[bold]fedsim[/bold] {text}")

    def round(self, r: dict[str, Any]) -> None:
        if self.quiet:
            return
        width = len(str(self.rounds))
        self.console.print(
            f"round {r['round']:>{width}}/{self.rounds}"
            f"  loss {_fmt(r.get('train_loss'), '.4f')}"
            f"  acc {_fmt(r.get('eval_accuracy'), '.4f')}"
            f" (clients {_fmt(r.get('eval_accuracy_client_mean'), '.3f')}"
            f", min {_fmt(r.get('eval_accuracy_client_min'), '.3f')})"
            f"  up {human_bytes(r['bytes_up'])}  down {human_bytes(r['bytes_down'])}"
            f"  ok {r['clients_ok']}/{r['clients_ok'] + r['clients_failed']}"
            f"  {r['round_time_s']:.2f} s"
            + (f"  clock {human_seconds(r['sim_time_s'])}" if "sim_time_s" in r else "")
        )

    def warning(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/yellow] {text}")

    def line(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)

    def final(self, text: str) -> None:
        """The run's closing line: printed with ``quiet=true`` too (where the results are)."""
        self.console.print(text)
