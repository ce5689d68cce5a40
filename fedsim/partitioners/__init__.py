"""fedsim's partitioners: how the task's pool of examples is split among the clients.

* :class:`NaturalGroupPartitioner` (``partition=natural``): whole natural groups per client.
* :class:`DirichletPartitioner` (``partition=dirichlet``), :class:`IidPartitioner`
  (``partition=iid``) and :class:`PathologicalPartitioner` (``partition=pathological``):
  flwr-datasets' assignments, the same rows in the same order for the same arguments and seed,
  computed with numpy arrays instead of Python lists or a dataset per partition, so that
  100,000 clients take seconds rather than minutes (``python benchmarks/partition.py``
  measures them). fedsim reads each partition's rows as an array
  (``partition_indices``, ``partition_sizes``); ``load_partition`` gives flwr-datasets' form.
"""

from fedsim.partitioners.dirichlet import DirichletPartitioner
from fedsim.partitioners.natural import GROUP, NaturalGroupPartitioner
from fedsim.partitioners.shards import IidPartitioner, PathologicalPartitioner

__all__ = [
    "GROUP",
    "DirichletPartitioner",
    "IidPartitioner",
    "NaturalGroupPartitioner",
    "PathologicalPartitioner",
]
