"""Engines run the same ServerApp and ClientApp in different ways (config group ``engine``)."""

from fedsim.engines.batched import BatchedEngine, BatchedGrid
from fedsim.engines.inline import InlineEngine, InlineGrid
from fedsim.engines.ray import RayEngine

__all__ = ["BatchedEngine", "BatchedGrid", "InlineEngine", "InlineGrid", "RayEngine"]
