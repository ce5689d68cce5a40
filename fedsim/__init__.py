"""fedsim: a federated fine-tuning simulator.

Flower clients fine-tune low-rank adapters of a frozen pretrained model on their own partition
of the data; pluggable server strategies aggregate them. See README.md and docs/.
"""

import os

# Flower phones home for telemetry and update checks unless told not to; a simulator must run
# offline. Set before anything imports flwr (Ray workers inherit the environment).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# Models and tokenizers come from local folders and installed packages: never the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
