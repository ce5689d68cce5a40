"""fedsim.dropout: torch's dropout value for value for a client alone, attention by its
definition (checked in numpy), and, under vmap, each client's masks from its own generator at
its own number of examples and cut length."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from fedsim.dropout import (
    StreamedDropout,
    client_streams,
    drop,
    sequence_dims,
    without_dropout,
)


def test_streamed_dropout_is_torchs_dropout_on_a_cpu():
    x = torch.randn(4, 7, 5)
    layers = (
        torch.nn.Dropout(0.3),
        lambda t: F.dropout(t, 0.3),
        lambda t: F.dropout(t),
        lambda t: torch.nn.Dropout(0.3, inplace=True)(t.clone()),
    )
    for layer in layers:
        torch.manual_seed(11)
        want = layer(x)
        torch.manual_seed(11)
        with StreamedDropout():
            got = layer(x)
        assert torch.equal(got, want)
    y = x.clone()
    torch.manual_seed(11)
    with StreamedDropout():
        F.dropout(y, 0.3, inplace=True)  # the result unused: y itself is dropped
    assert torch.equal(y, want)
    with StreamedDropout():
        assert F.dropout(x, 0.3, training=False) is x
        assert F.dropout(x, 0.0) is x
        assert torch.equal(F.dropout(x, 1.0), torch.zeros_like(x))


def test_attention_without_dropout_is_left_to_torch():
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with StreamedDropout():
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(got, want)


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["bool", "float", "causal", "gqa"])
def test_attention_with_dropout_is_its_definition(kind):
    """softmax(q k^T / sqrt(d) + mask) with each weight kept with probability 1 - p and
    scaled by 1 / (1 - p), times v: computed in numpy with the mask drawn as torch draws it."""
    g = torch.Generator().manual_seed(0)
    heads_kv = 1 if kind == "gqa" else 2
    q = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, heads_kv, 6, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, heads_kv, 6, 3, generator=g, dtype=torch.float64)
    allowed = torch.rand(2, 1, 5, 6, generator=g) > 0.4
    allowed[..., 0] = True
    kwargs = {"dropout_p": 0.25}
    add = np.zeros((2, 1, 5, 6))
    if kind == "bool":
        kwargs["attn_mask"] = allowed
        add = np.where(allowed.numpy(), 0.0, -np.inf)
    elif kind == "float":
        kwargs["attn_mask"] = torch.where(allowed, 0.0, -1e30).double()
        add = np.where(allowed.numpy(), 0.0, -1e30)
    elif kind == "causal":
        kwargs["is_causal"] = True
        add = np.where(np.tril(np.ones((5, 6), bool)), 0.0, -np.inf)[None, None]
    else:
        kwargs["enable_gqa"] = True
    torch.manual_seed(3)
    with StreamedDropout():
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.manual_seed(3)
    keep = torch.empty(2, 2, 5, 6, dtype=torch.float64).bernoulli_(0.75).numpy()
    kn, vn = k.numpy(), v.numpy()
    if kind == "gqa":
        kn, vn = np.repeat(kn, 2, axis=1), np.repeat(vn, 2, axis=1)
    weights = _softmax(q.numpy() @ kn.transpose(0, 1, 3, 2) / np.sqrt(4) + add)
    want = (weights * keep / 0.75) @ vn
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    assert 0 < keep.mean() < 1


def test_sequence_dims_follow_hugging_faces_layouts():
    assert sequence_dims((4, 9, 32), 9) == (1,)  # examples, tokens, features
    assert sequence_dims((4, 9, 9), 9) == (1,)  # features that happen to equal the length
    assert sequence_dims((4, 2, 9, 9), 9) == (2, 3)  # attention weights
    assert sequence_dims((4, 9, 9, 9), 9) == (2, 3)  # heads that happen to equal it
    assert sequence_dims((4, 1, 32), 9) == ()  # not cut to the group's length
    assert sequence_dims((4, 32), 9) == ()  # pooled


@pytest.mark.parametrize("shape", [(6, 5), (6, 6), (2, 6, 6), (6, 6, 6)])
def test_each_client_draws_its_own_masks_under_vmap(shape):
    """Client i's mask in a group: drawn from its own generator at (its examples, its cut
    length), as when it trains alone; the group's padding is kept (and scaled like any kept
    entry: it has no weight and no query attends it)."""
    sizes, lengths, seeds, p = [2, 3, 1], [4, 6, 5], [7, 8, 9], 0.4
    x = torch.randn(3, 3, *shape)  # (clients, examples, ...)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with client_streams(generators, sizes, lengths if len(shape) > 1 else None):
        got = vmap(lambda t: drop(t, p), randomness="different")(x)
    for i, (n, length, seed) in enumerate(zip(sizes, lengths, seeds)):
        own = [n, *shape]
        if len(shape) == 2:
            own[1] = length
        elif len(shape) == 3:
            own[2] = own[3] = length
        keep = torch.empty(own).bernoulli_(1 - p, generator=torch.Generator().manual_seed(seed))
        mask = torch.full_like(x[i], 1 / (1 - p))
        mask[tuple(slice(0, s) for s in own)] = keep / (1 - p)
        torch.testing.assert_close(got[i], x[i] * mask, rtol=0, atol=0)


def test_dropout_under_vmap_needs_the_clients_streams():
    with pytest.raises(RuntimeError, match="client_streams"):
        vmap(lambda t: drop(t, 0.5), randomness="different")(torch.ones(2, 3))


def test_per_example_dropout_must_run_inside_the_vmap_over_clients():
    """DP-SGD's examples' level hands each client's whole batch to the clients' level; with no
    clients' level (no client's stream) it is an error, not a draw from torch's generator."""
    one = torch.ones(4, 1, 3)  # 4 examples, each a batch of one
    with client_streams([torch.Generator()], [4], per_example=True):
        with pytest.raises(RuntimeError, match="outside the vmap over clients"):
            vmap(lambda t: drop(t, 0.5), randomness="different")(one)


def test_per_example_masks_are_slices_of_the_clients_batch_masks():
    sizes, seeds, p = [3, 2], [5, 6], 0.5
    x = torch.randn(2, 3, 1, 7)  # (clients, examples, a batch of one, features)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    inner = vmap(lambda t: drop(t, p), randomness="different")
    with client_streams(generators, sizes, per_example=True):
        got = vmap(inner, randomness="different")(x)
    for i, (n, seed) in enumerate(zip(sizes, seeds)):
        keep = torch.empty(n, 7).bernoulli_(1 - p, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(got[i, :n, 0], x[i, :n, 0] * keep / (1 - p), rtol=0, atol=0)


def test_the_streams_nest():
    g = [torch.Generator()]
    with client_streams(g, [1], [3]):
        with client_streams(g, [2]):
            pass
        from fedsim.dropout import _GROUP

        assert _GROUP.sizes == [1] and _GROUP.lengths == [3]
        with without_dropout():
            with without_dropout():
                pass
            assert drop(torch.ones(3), 0.5).eq(1).all()


def test_without_dropout_drop_is_the_identity():
    x = torch.randn(5, 4)
    with without_dropout():
        assert drop(x, 0.5) is x
    assert not torch.equal(drop(x, 0.5), x)
