"""Tasks: a pretrained model and labelled data (one module per task)."""

from fedsim.tasks.base import Batch, Task
from fedsim.tasks.generative import CausalLMTask, MathTask
from fedsim.tasks.synthetic import SyntheticTask
from fedsim.tasks.text import HFTask, NewsTask, SentimentTask, TextClassificationTask

__all__ = [
    "Batch",
    "CausalLMTask",
    "HFTask",
    "MathTask",
    "NewsTask",
    "SentimentTask",
    "SyntheticTask",
    "Task",
    "TextClassificationTask",
]
