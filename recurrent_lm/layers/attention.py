"""Causal softmax attention, full or sliding-window, with a KV cache as its state.

Per head, with ``q = W_q x``, ``k = W_k x``, ``v = W_v x`` (grouped-query:
``H / H_kv`` query heads share one key/value head)::

    o_i = Σ_{j ∈ N(i)} softmax_j(q_i · k_j / √d) v_j ,   y = W_o [o^1; …; o^H]

where ``N(i) = {j ≤ i}`` for full attention and ``{i − w < j ≤ i}`` for a
window ``w``, restricted to the document of ``i`` when ``segment_ids`` are given.

Rotary embeddings (``rope_theta`` set) rotate each pair of channels
``(x_c, x_{c+d/2})`` of q and k by the angle ``p · θ^{−2c/d}`` at position
``p``. Positions are absolute positions in the row (``cache.index + t`` when
decoding), not positions inside a document: rotary scores depend only on
``p_i − p_j``, so a packed row still equals its documents run one by one.

The state is an ``ops.KVCache`` of fixed capacity: ``max_len`` tokens for full
attention, ``window`` tokens (a ring buffer) for a sliding window.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common


class Attention(nn.Module):
  """Multi-head (grouped-query) causal softmax attention.

  Attributes:
    d_model: model width D.
    num_heads: query heads H.
    head_dim: width per head d; ``d_model // num_heads`` if None.
    num_kv_heads: key/value heads H_kv (divides H); ``num_heads`` if None.
    window: sliding-window length w (a query sees w keys, itself included);
      None for full attention.
    max_len: cache capacity of full attention, the longest sequence it can
      continue (the op returns NaN past it rather than forget silently);
      unused with a window, whose cache holds ``window`` tokens.
    rope_theta: rotary base θ; None for no rotary embedding.
    use_bias: biases on the q/k/v/o projections.
    dtype: compute dtype and dtype of the cache.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int
  head_dim: int | None = None
  num_kv_heads: int | None = None
  window: int | None = None
  max_len: int = 2048
  rope_theta: float | None = None
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int]:
    """``(head_dim, num_kv_heads)`` after defaults, validated."""
    head_dim, num_kv_heads = _common.attention_head_dims(
        self.d_model, self.num_heads, self.head_dim, self.num_kv_heads)
    if self.rope_theta is not None and head_dim % 2:
      raise ValueError(f"head_dim={head_dim} is odd; rotary embeddings need an even head_dim")
    if self.window is not None and self.window < 1:
      raise ValueError(f"window={self.window}; expected a positive int or None")
    return head_dim, num_kv_heads

  def init_state(self, batch_size: int, dtype=None) -> ops.KVCache:
    """An empty cache: ``window`` slots with a window, else ``max_len``.

    Args:
      batch_size: B.
      dtype: dtype of the cached keys and values; ``self.dtype`` if None.
    """
    head_dim, num_kv_heads = self._dims()
    capacity = self.max_len if self.window is None else self.window
    return ops.init_kv_cache(batch_size, capacity, num_kv_heads, head_dim,
                             dtype=self.dtype if dtype is None else dtype)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Attends causally over the cache and ``x``.

    Args:
      x: ``[B, T, D]``.
      state: an ``ops.KVCache`` from ``init_state`` or a previous call, or None
        at a sequence start.
      segment_ids: ``[B, T]`` document ids; a query sees keys of its own
        document only.

    Returns:
      ``(y, cache)``: ``y`` ``[B, T, D]`` in ``dtype`` and the cache holding
      the keys and values of ``x`` too.
    """
    _common.check_input(x, self.d_model)
    head_dim, num_kv_heads = self._dims()
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    q, k, v = _common.attention_qkv(x, num_heads=self.num_heads, num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, **proj)
    if self.rope_theta is not None:
      start = 0 if state is None else state.index
      positions = start + jnp.arange(x.shape[1])
      q = _common.rotate(q, positions, self.rope_theta)
      k = _common.rotate(k, positions, self.rope_theta)
    if state is None:
      # Without a cache to read, the op takes its fast path; the cache is
      # filled afterwards for whoever continues the sequence.
      o, _ = ops.softmax_attention(q, k, v, window=self.window, segment_ids=segment_ids)
      cache = ops.write_kv_cache(self.init_state(x.shape[0]), k, v, segment_ids)
    else:
      o, cache = ops.softmax_attention(q, k, v, window=self.window,
                                       segment_ids=segment_ids, cache=state)
    y = _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                      name="o_proj", **proj)(o.astype(self.dtype))
    return y, cache
