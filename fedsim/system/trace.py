"""Client profiles read from a trace file (``system=trace system.file=PATH``), FedScale style.

A JSON file maps each client id (``"0"``, ``"1"``, ...) to its record; a CSV file has a
``client`` column and one row per client. A record holds:

* speed: ``gflops`` (sustained GFLOP/s; the task's FLOPs per example give the compute time)
  or ``computation`` (FedScale's device trace: milliseconds per example, taken as measured:
  the trace then belongs to the model it was measured on);
* bandwidth: ``communication`` (FedScale: kbit/s, both directions) or ``up_kbps`` and
  ``down_kbps``;
* ``latency_ms`` (optional, default 0);
* availability (optional, default always online): ``active`` and ``inactive``, the starts
  and ends of the online intervals in seconds (FedScale's availability trace; in a CSV,
  numbers separated by ``;``), with ``finish_time`` the period after which the pattern
  repeats (optional: without it the client stays offline after its last interval). FedScale's
  ``duration`` and ``model`` keys are accepted and ignored.

Every problem is one line naming the file, the client and the value.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError
from fedsim.system.availability import Always, Availability, Intervals
from fedsim.system.profiles import Profile, System

SPEED = ("gflops", "computation")
BANDWIDTH = ("communication", "up_kbps", "down_kbps")
AVAILABILITY = ("active", "inactive", "finish_time")
IGNORED = ("duration", "model")
KNOWN = (*SPEED, *BANDWIDTH, "latency_ms", *AVAILABILITY, *IGNORED)


def read_records(path: Path) -> dict[int, dict[str, Any]]:
    """Client id -> raw record, from a JSON or CSV file."""
    key = "system.file"
    if not path.is_file():
        raise ConfigError(key, str(path), "no such file (a JSON or CSV trace of client profiles)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(key, str(path), f"cannot be read: {e}") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or "client" not in rows[0]:
            raise ConfigError(key, str(path), "a CSV trace needs a header with a client column")
        raw = {row.pop("client"): row for row in rows}
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(key, str(path), f"is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(key, str(path), "must map client ids to records (a JSON object)")
    out: dict[int, dict[str, Any]] = {}
    for cid, record in raw.items():
        try:
            client = int(str(cid).strip())
        except ValueError:
            raise ConfigError(key, str(path), f"client id {cid!r} is not an integer") from None
        if not isinstance(record, dict):
            raise ConfigError(key, str(path), f"client {client}: the record must be an object")
        if client in out:
            raise ConfigError(key, str(path), f"client {client} appears twice")
        out[client] = {k: v for k, v in record.items() if v not in ("", None)}
    return out


class TraceRecord:
    """One client's record, checked (``where``: the file and client, for messages)."""

    def __init__(self, record: dict[str, Any], where: str) -> None:
        self.record, self.where = record, where
        unknown = sorted(set(record) - set(KNOWN))
        if unknown:
            self.fail(unknown[0], record[unknown[0]], f"unknown key; allowed: {', '.join(KNOWN)}")

    def fail(self, name: str, value: Any, allowed: str):
        raise ConfigError("system.file", self.where, f"{name}={value}: {allowed}")

    def number(self, name: str, low: float = 0.0, strict: bool = True) -> float:
        value = self.record[name]
        try:
            x = float(value)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x) or x < low or (strict and x == low):
            self.fail(name, value, f"must be a finite number {'>' if strict else '>='} {low:g}")
        return x

    def times(self, name: str) -> list[float]:
        value = self.record.get(name, [])
        if isinstance(value, str):
            value = [v for v in value.replace(",", ";").split(";") if v.strip()]
        if not isinstance(value, list):
            self.fail(name, value, "must be a list of times in seconds")
        self.record[name] = value
        out = []
        for v in value:
            try:
                out.append(float(v))
            except (TypeError, ValueError):
                self.fail(name, value, "must be a list of numbers (seconds)")
        return out

    def one_of(self, names: tuple[str, ...]) -> str:
        given = [n for n in names if n in self.record]
        if len(given) != 1:
            self.fail("/".join(names), given or "none", f"give exactly one of {', '.join(names)}")
        return given[0]

    def profile(self) -> Profile:
        speed = self.one_of(SPEED)
        value = self.number(speed)
        gflops, ms = (value, None) if speed == "gflops" else (math.nan, value)
        if "communication" in self.record:
            if "up_kbps" in self.record or "down_kbps" in self.record:
                self.fail("communication", self.record["communication"], "or up_kbps/down_kbps")
            up = down = self.number("communication")
        elif "up_kbps" in self.record and "down_kbps" in self.record:
            up, down = self.number("up_kbps"), self.number("down_kbps")
        else:
            self.fail(
                "bandwidth", "missing", "give communication (kbit/s) or up_kbps and down_kbps"
            )
        latency = self.number("latency_ms", strict=False) if "latency_ms" in self.record else 0.0
        return Profile(gflops, up / 1000, down / 1000, latency / 1000, self.availability(), ms)

    def availability(self) -> Availability:
        if not any(k in self.record for k in AVAILABILITY):
            return Always()
        active, inactive = self.times("active"), self.times("inactive")
        if len(active) != len(inactive):
            self.fail("active", self.record.get("active"), "needs one inactive time per start")
        edges = [x for pair in zip(active, inactive) for x in pair]
        if any(x < 0 for x in edges) or any(b <= a for a, b in zip(active, inactive)):
            self.fail("active", active, "intervals must start at >= 0 and end after they start")
        if any(b > a for a, b in zip(edges[1:], edges[:-1])):
            self.fail("active", active, "intervals must be sorted and must not overlap")
        period = None
        if "finish_time" in self.record:
            period = self.number("finish_time")
            if edges and edges[-1] > period:
                self.fail("finish_time", period, f"must be >= the last inactive time {edges[-1]:g}")
        return Intervals(active, inactive, period)


class Trace(System):
    """Profiles from a trace file (see the module docstring).

    Parameters
    ----------
    file : str
        A ``.json`` or ``.csv`` trace; it must hold a record for every client
        ``0 .. sim.num_clients - 1`` (more are ignored).
    """

    def __init__(self, file: str = "???", name: str = "trace", targets=()) -> None:
        super().__init__(name, targets)
        self.path = Path(str(file)).expanduser()
        self.records = read_records(self.path)
        self.profiles: dict[int, Profile] = {}

    def bind(self, num_clients: int, seed: int) -> None:
        super().bind(num_clients, seed)
        missing = [c for c in range(num_clients) if c not in self.records]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise ConfigError(
                "system.file",
                str(self.path),
                f"has no record for {len(missing)} of the sim.num_clients={num_clients} "
                f"clients (ids {shown}); a trace must cover clients 0..{num_clients - 1}",
            )
        self.profiles = {
            c: TraceRecord(dict(self.records[c]), f"{self.path} client {c}").profile()
            for c in range(num_clients)
        }

    def make(self, client: int) -> Profile:
        return self.profiles[client]

    @property
    def has_availability(self) -> bool:
        return any(not isinstance(p.availability, Always) for p in self.profiles.values())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "file": str(self.path)}
