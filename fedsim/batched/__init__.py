"""Training many clients at once: one vmapped forward and backward over stacked adapters.

The clients of a round share the frozen base model and differ only in small tensors: their
trained adapter and head, sometimes their frozen factors or folded base. The batched trainer
stacks the tensors that differ along a new leading client dimension and runs each local step of
a whole group of clients as one ``torch.func.vmap`` of ``functional_call`` over the shared
model: the base's matrix products see every client's examples at once and the adapters'
become batched matrix products (the idea of multi-adapter serving such as S-LoRA, applied to
training).

Each client keeps what the inline engine gives it: its own parameter leaves, its own optimizer
(any ``torch.optim`` class from the ``optimizer`` group, with its state when
``sim.keep_optimizer_state``), its own batch order (its generator), its own adapter-dropout
masks and the model's own (:mod:`fedsim.dropout`) and its own position in the learning-rate
schedule. The sum of the group's losses has, with respect to each client's leaves,
exactly that client's gradient, so every client's update is the inline engine's up to float
rounding.

The package: :mod:`~fedsim.batched.trainer` (the jobs and :func:`train_group`),
:mod:`~fedsim.batched.group` (padded batches and the vmapped loss),
:mod:`~fedsim.batched.optimizers` (the stacked optimizers) and :mod:`~fedsim.batched.dpsgd`
(DP-SGD's per-example gradients).
"""

from fedsim.batched.dpsgd import per_example_gradients
from fedsim.batched.group import group_mean_losses, padded_group, quiet_fallbacks, vmapped_loss
from fedsim.batched.jobs import ClientJob, ClientOutcome
from fedsim.batched.optimizers import StackedAdamW, StackedSGD, stacked_optimizer
from fedsim.batched.trainer import train_group

__all__ = [
    "ClientJob",
    "ClientOutcome",
    "StackedAdamW",
    "StackedSGD",
    "group_mean_losses",
    "padded_group",
    "per_example_gradients",
    "quiet_fallbacks",
    "stacked_optimizer",
    "train_group",
    "vmapped_loss",
]
