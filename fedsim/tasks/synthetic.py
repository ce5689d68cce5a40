"""A tiny, deterministic stand-in for fine-tuning a pretrained model.

Inputs are Gaussian, ``x = U m_y + noise``: the class signal lives in a ``signal_dim``-dimensional
subspace ``U`` of the input space, with class means ``m_k`` drawn ``separation`` apart. The
"pretrained" base is a small MLP with seeded weights whose first layer all but erases that
subspace (``W0 <- W0 (I - (1 - leak) U U^T)``): features learnt for another task. A fresh head on
the frozen base cannot recover the classes (about chance level); a low-rank update of the first
layer can (rank ``signal_dim`` suffices). That is the situation low-rank adapters are made for,
in a network small enough for 10 clients x 5 rounds to run in seconds.

Clients differ through the partitioner (label skew, ``conf/partition``) and, optionally,
through a per-client input offset (``client_shift``, feature skew: client ``i`` sees
``x + delta_i`` with the label of ``x``). The server's global test set has no offset.

Where the examples come from (``pool``): ``stored`` draws the whole pool from one seeded stream
up front and keeps it (``num_clients * examples_per_client * input_dim`` floats: 3.3 GB for
100,000 clients of 256 examples); ``on_demand`` makes example ``i`` from its index with a
counter-based generator (:mod:`fedsim.tasks.counter_rng`) when a client needs it and keeps only
the labels (one byte each), which the partitioner needs up front. Same distribution, other
random numbers: runs with one and with the other differ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import ConfigError
from fedsim.tasks import counter_rng
from fedsim.tasks.base import Batch, Task
from fedsim.validate import integer, number

#: ``task.pool``: the whole pool drawn up front and kept, or each example made from its index
POOLS = ("stored", "on_demand")


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))


class SyntheticNet(nn.Module):
    """``num_layers`` blocks (``blocks.i.fc``, GELU), then ``classifier``."""

    def __init__(self, input_dim: int, hidden_dim: int, num_layers: int, num_classes: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * num_layers
        self.blocks = nn.ModuleList(Block(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def _init_linear(layer: nn.Linear, g: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``g``."""
    with torch.no_grad():
        w = torch.empty_like(layer.weight)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        layer.weight.copy_(w)
        bound = 1 / math.sqrt(layer.in_features)
        layer.bias.copy_(torch.empty_like(layer.bias).uniform_(-bound, bound, generator=g))


class SyntheticTask(Task):
    """Synthetic classification with a frozen MLP base (see the module docstring).

    Parameters
    ----------
    num_clients : int
        Number of clients; the client pool holds ``num_clients * examples_per_client`` examples.
    num_classes, input_dim, hidden_dim, num_layers : int
        Shape of the network.
    signal_dim : int
        Dimension of the class-signal subspace (<= input_dim).
    separation : float
        Scale of the class means inside that subspace (noise has unit variance).
    leak : float
        Share of the signal the pretrained first layer lets through, in [0, 1].
    examples_per_client, test_examples : int
        Pool size per client; size of the server's global test set.
    server_examples : int
        Size of the server's own split (drawn like the test set, disjoint from it), used by
        LoRA-SB's initialisation with ``adapter.init.source=server``.
    client_shift : float
        Standard deviation of each client's input offset (0: none).
    seed : int
        Seed of the base weights, the subspace, the class means and the data.
    pool : str
        ``stored`` (the pool drawn up front and kept) or ``on_demand`` (each example made from
        its index when needed; only the labels are kept): see the module docstring.
    """

    name = "synthetic"
    head_modules = ("classifier",)
    default_target_modules = ("fc",)

    def __init__(
        self,
        num_clients: int,
        num_classes: int = 10,
        input_dim: int = 32,
        hidden_dim: int = 128,
        num_layers: int = 3,
        signal_dim: int = 4,
        separation: float = 3.0,
        leak: float = 0.05,
        examples_per_client: int = 256,
        test_examples: int = 2000,
        server_examples: int = 512,
        client_shift: float = 0.0,
        seed: int = 0,
        pool: str = "stored",
    ) -> None:
        self.num_clients = integer("task.num_clients", num_clients, low=1)
        self.num_classes = integer("task.num_classes", num_classes, low=2)
        self.input_dim = integer("task.input_dim", input_dim, low=1)
        self.hidden_dim = integer("task.hidden_dim", hidden_dim, low=1)
        self.num_layers = integer("task.num_layers", num_layers, low=1)
        self.examples_per_client = integer("task.examples_per_client", examples_per_client, low=1)
        self.test_examples = integer("task.test_examples", test_examples, low=1)
        self.server_examples = integer("task.server_examples", server_examples, low=0)
        self.seed = integer("task.seed", seed, low=0)
        self.signal_dim = integer("task.signal_dim", signal_dim, 1, input_dim, "task.input_dim")
        self.separation = number("task.separation", separation, low=0)
        self.client_shift = number("task.client_shift", client_shift, low=0)
        self.leak = number("task.leak", leak, 0, 1)
        if pool not in POOLS:
            raise ConfigError("task.pool", pool, f"must be one of {', '.join(POOLS)}")
        self.pool = pool
        self._data: tuple[torch.Tensor, ...] | None = None
        self._labels: np.ndarray | None = None  # on_demand: the pool's and the test set's
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None  # on_demand's test set
        self._signal: torch.Tensor | None = None  # on_demand: class means in input space

    def _generator(self, stream: int) -> torch.Generator:
        mixed = np.random.SeedSequence([self.seed, stream]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(mixed))

    def _subspace(self) -> torch.Tensor:
        basis = torch.randn(self.input_dim, self.signal_dim, generator=self._generator(1))
        return torch.linalg.qr(basis)[0]  # input_dim x signal_dim, orthonormal columns

    def build_model(self) -> nn.Module:
        net = SyntheticNet(self.input_dim, self.hidden_dim, self.num_layers, self.num_classes)
        g = self._generator(0)
        for module in net.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, g)
        u = self._subspace()
        damp = torch.eye(self.input_dim) - (1.0 - self.leak) * (u @ u.T)
        with torch.no_grad():
            first = net.blocks[0].fc
            first.weight.copy_(first.weight @ damp)
        return net

    def _generate(self) -> tuple[torch.Tensor, ...]:
        if self._data is None:
            g = self._generator(2)
            n_pool = self.examples_per_client * self.num_clients
            n = n_pool + self.test_examples
            means = self.separation * torch.randn(self.num_classes, self.signal_dim, generator=g)
            y = torch.randint(0, self.num_classes, (n,), generator=g)
            x = torch.randn(n, self.input_dim, generator=g) + means[y] @ self._subspace().T
            self._data = (x[:n_pool], y[:n_pool], x[n_pool:], y[n_pool:])
        return self._data

    def _means(self) -> torch.Tensor:
        """The class means (the first draw of the data stream, as in the stored pool)."""
        g = self._generator(2)
        return self.separation * torch.randn(self.num_classes, self.signal_dim, generator=g)

    @property
    def _pool_size(self) -> int:
        return self.examples_per_client * self.num_clients

    def _on_demand_labels(self) -> np.ndarray:
        """The labels of every example, pool then test set (``pool=on_demand``)."""
        if self._labels is None:
            key = counter_rng.stream_key(self.seed, 2, 1)
            n = self._pool_size + self.test_examples
            self._labels = counter_rng.integers(key, 0, n, self.num_classes)
        return self._labels

    def _on_demand(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``rows`` (pool then test set) made from their indices (``pool=on_demand``)."""
        if self._signal is None:  # each class's mean in input space
            self._signal = self._means() @ self._subspace().T
        rows = np.asarray(rows, dtype=np.int64)
        y = torch.as_tensor(self._on_demand_labels()[rows].astype(np.int64))
        noise = counter_rng.normal(counter_rng.stream_key(self.seed, 2, 2), rows, self.input_dim)
        return torch.as_tensor(noise, dtype=torch.float32) + self._signal[y], y

    def pool_labels(self) -> np.ndarray:
        if self.pool == "on_demand":
            return self._on_demand_labels()[: self._pool_size]
        return self._generate()[1].numpy()

    def client_offset(self, client: int) -> torch.Tensor:
        g = self._generator(1_000_000 + client)
        return self.client_shift * torch.randn(self.input_dim, generator=g)

    def pool_examples(self, indices: np.ndarray, client: int) -> Batch:
        if self.pool == "on_demand":
            xs, ys = self._on_demand(indices)
        else:
            x, y = self._generate()[:2]
            idx = torch.as_tensor(indices, dtype=torch.long)
            xs, ys = x[idx], y[idx]
        if self.client_shift:
            xs = xs + self.client_offset(client)
        return {"x": xs, self.label_key: ys}

    def test_set(self) -> Batch:
        if self.pool == "on_demand":
            if self._test is None:
                self._test = self._on_demand(np.arange(self.test_examples) + self._pool_size)
            x, y = self._test
        else:
            x, y = self._generate()[2:]
        return {"x": x, self.label_key: y}

    def server_size(self) -> int:
        return self.server_examples

    def server_set(self) -> Batch:
        # Its own stream, so that adding a server split leaves the clients' data unchanged.
        g = self._generator(3)
        means = self._means()
        y = torch.randint(0, self.num_classes, (self.server_examples,), generator=g)
        x = torch.randn(self.server_examples, self.input_dim, generator=g)
        return {"x": x + means[y] @ self._subspace().T, self.label_key: y}
