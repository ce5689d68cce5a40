"""Tasks: a pretrained model and labelled data (one module per task)."""

from fedsim.tasks.base import Batch, Task
from fedsim.tasks.synthetic import SyntheticTask

__all__ = ["Batch", "SyntheticTask", "Task"]
