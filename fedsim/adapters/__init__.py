"""Low-rank adapters: one module per method, each a small ``Adapter`` subclass."""

from fedsim.adapters.base import Adapter, AdapterSpec, matching_linear_modules
from fedsim.adapters.lora import FFALoRA, LoRA, LoRALinear
from fedsim.adapters.lora_sb import LoRASB, LoRASBLinear

__all__ = [
    "Adapter",
    "AdapterSpec",
    "FFALoRA",
    "LoRA",
    "LoRALinear",
    "LoRASB",
    "LoRASBLinear",
    "matching_linear_modules",
]
