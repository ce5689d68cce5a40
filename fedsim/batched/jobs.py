"""What one client brings to a batched group, and what it takes away."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsim.privacy import ClientDP
from fedsim.tasks.base import Batch
from fedsim.training import LocalResult, LocalTerms


@dataclass
class ClientJob:
    """One client's share of a batched group."""

    params: dict[str, torch.Tensor]  # its trained parameters' starting values, by name
    context: dict[str, torch.Tensor]  # other tensors of its model that may differ per client
    data: Batch
    generator: torch.Generator  # its batch order
    start_step: int  # its global step count (the schedule's position)
    optimizer_state: dict | None = None  # fedsim.training.optimizer_state_arrays, if kept
    dp: ClientDP | None = None  # DP-SGD: its Poisson rate, noise and accountant
    terms: LocalTerms | None = None  # FedProx's proximal term, SCAFFOLD's correction


@dataclass
class ClientOutcome:
    result: LocalResult
    params: dict[str, torch.Tensor]  # its trained parameters after the local steps
    #: its optimizer's per-parameter state, as ``torch.optim.Optimizer.state_dict()["state"]``
    optimizer_state: dict[int, dict[str, torch.Tensor]]
