"""Simulated devices, networks and time (config group ``system``; docs/system.md)."""

from fedsim.system.clock import ClientTime, Clock
from fedsim.system.flops import flops_per_example
from fedsim.system.profiles import NoSystem, Profile, Sampled, System, Tiers
from fedsim.system.trace import Trace

__all__ = [
    "ClientTime",
    "Clock",
    "NoSystem",
    "Profile",
    "Sampled",
    "System",
    "Tiers",
    "Trace",
    "flops_per_example",
]
