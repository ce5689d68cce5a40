"""Low-rank adapters: one module per method, each a small ``Adapter`` subclass."""

from fedsim.adapters.base import Adapter, AdapterSpec, matching_linear_modules
from fedsim.adapters.lora import LoRA, LoRALinear

__all__ = ["Adapter", "AdapterSpec", "LoRA", "LoRALinear", "matching_linear_modules"]
