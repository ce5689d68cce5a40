"""fedsim's server strategies: the public interface a strategy is written against.

A strategy (:class:`AdapterStrategy`) is an aggregation rule with its client half; most
override :meth:`~AdapterStrategy.aggregate` only (``strategies/fedavg.py``). Variants:
:class:`PersonalStrategy` (clients keep some parameters), :class:`FoldingStrategy` (changes
folded into the clients' frozen base), :class:`PluginStrategy` (a user's aggregator class).
:class:`Federation` is the Flower strategy the server runs: the strategy inside the run's
uplink chain (:mod:`fedsim.uplink`).
"""

from fedsim.init import FROZEN
from fedsim.messages import (
    ClientCall,
    ClientUpdate,
    check_arrays,
    extend_record,
    merge_records,
    split_prefix,
    weighted_mean,
    with_prefix,
)
from fedsim.strategy.base import AdapterStrategy, StrategyContext
from fedsim.strategy.folding import FoldingStrategy
from fedsim.strategy.personal import INITIAL, PersonalStrategy
from fedsim.strategy.plugins import PluginStrategy, as_strategy
from fedsim.strategy.rounds import Federation, check_aggregate
from fedsim.strategy.sampling import ClientSampler

__all__ = [
    "FROZEN",
    "INITIAL",
    "AdapterStrategy",
    "ClientCall",
    "ClientSampler",
    "ClientUpdate",
    "Federation",
    "FoldingStrategy",
    "PersonalStrategy",
    "PluginStrategy",
    "StrategyContext",
    "as_strategy",
    "check_aggregate",
    "check_arrays",
    "extend_record",
    "merge_records",
    "split_prefix",
    "weighted_mean",
    "with_prefix",
]
