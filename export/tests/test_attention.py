"""The decoder's exported attention (families.shared.grouped_attention) against transformers'
eager attention, which repeats each key/value head for its group of query heads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vlmexport.families.shared import causal_mask, grouped_attention


@pytest.mark.parametrize("heads,kv_heads,q_len", [(9, 3, 1), (9, 3, 4), (4, 4, 3), (4, 1, 2)])
def test_grouped_attention_equals_eager_attention(heads, kv_heads, q_len):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(0)
    batch, kv_len, head_dim = 2, 7, 8
    query = torch.randn(batch, heads, q_len, head_dim)
    key = torch.randn(batch, kv_heads, kv_len, head_dim)
    value = torch.randn(batch, kv_heads, kv_len, head_dim)
    # Row 0 left-padded by two positions, both rows causal over the new positions.
    allowed = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    allowed[0, :, :, :2] = False
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)

    expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=head_dim**-0.5)
    got, weights = grouped_attention(module, query, key, value, mask, scaling=head_dim**-0.5)

    assert got.shape == expected.shape == (batch, q_len, heads, head_dim)
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    assert weights is None


@pytest.mark.parametrize("q_len", [1, 3])
def test_older_block_is_read_under_one_softmax_with_the_recent_one(q_len):
    """Keys and values split into an older block and a recent one give eager attention over
    their concatenation; causal_mask builds the 4-D mask from the 2-D one."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    torch.manual_seed(1)
    batch, heads, kv_heads, head_dim, older, recent = 2, 9, 3, 8, 4, 5
    query = torch.randn(batch, heads, q_len, head_dim)
    key = torch.randn(batch, kv_heads, older + recent, head_dim)
    value = torch.randn(batch, kv_heads, older + recent, head_dim)
    padding = torch.ones(batch, older + recent, dtype=torch.long)
    padding[1, :3] = 0  # row 1 left-padded into the older block
    allowed = torch.ones(batch, 1, q_len, older + recent, dtype=torch.bool).tril(older + recent - q_len)
    allowed &= padding[:, None, None, :].bool()
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, layer_idx=0)

    expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=head_dim**-0.5)
    assert torch.equal(causal_mask(padding, q_len, torch.float32), mask)
    older_cache = ([(key[:, :, :older], value[:, :, :older])], mask)
    got, _ = grouped_attention(
        module, query, key[:, :, older:], value[:, :, older:], None, scaling=head_dim**-0.5, older_cache=older_cache
    )
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
