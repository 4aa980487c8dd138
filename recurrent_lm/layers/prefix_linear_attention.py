"""Prefix linear attention: the JRT-RNN mixer (Arora et al. 2024, "Just read twice").

The first ``M = prefix_len`` tokens of every document are a *prefix* that is
read twice: causally, as by any linear attention, and non-causally through
separate encoder projections ``k^e = W_ke x``, ``v^e = W_ve x``. Per head, with
the feature map ``φ`` (Taylor, as BASED), token ``i`` of a document gets::

    num_i = φ(q_i)ᵀ [Σ_{j≤i} φ(k_j) v_jᵀ  +  Σ_{j<M} φ(k^e_j) v^e_jᵀ]
    den_i = φ(q_i)ᵀ [Σ_{j≤i} φ(k_j)       +  Σ_{j<M} φ(k^e_j)]
    o_i   = num_i / (den_i + ε),        y_i = W_o [o_i^1; …; o_i^H]

so every token, the prefix's own included, sees the whole prefix through the
encoder, and decoding after the prefix is plain linear attention from the
state ``S = Σ_j φ(k_j) v_jᵀ + Σ_{j<M} φ(k^e_j) v^e_jᵀ`` (the encoder state
added to the decoder state once), ``z`` likewise.

Both sums are computed with ``ops.linear_attention`` on values with a column
of ones appended (the denominator rides along): a causal pass over
``(φ(q), φ(k), v)`` from the carried state, and a non-causal pass over
``(φ(q), φ(k^e) ⊙ [pos < M], v^e)`` (each position reads the final encoder
state of its document), so the cost stays linear in T.

Positions count from each document's start (``segment_ids``) and continue
across calls through the state, so packing and state passing hold. The
non-causal read sees the prefix tokens of the current call only: a prefill
must hold the whole prefix for the exact JRT read; a prefix split across calls
is read causally across the split (earlier parts are already in the state).
The feature map, the state and the denominator are computed in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common
from recurrent_lm.ops import _checks

_EPS = 1e-6


class PrefixLinearAttention(nn.Module):
  """JRT-RNN's prefix linear attention (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: heads H.
    prefix_len: M, tokens of every document read non-causally.
    feature_dim: per-head width of q, k and k^e before the feature map (d′).
    head_dim: per-head width of v and v^e; ``d_model // num_heads`` if None.
    feature_map: a name from ``ops.feature_maps``; ``taylor`` in JRT-RNN.
    chunk_size: chunk length of the chunked op.
    dtype: compute dtype of the projections and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int
  prefix_len: int
  feature_dim: int = 16
  head_dim: int | None = None
  feature_map: str = "taylor"
  chunk_size: int = 64
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int]:
    """``(mapped feature width K, head_dim V)`` after defaults, validated."""
    _checks.check_positive_int("prefix_len", self.prefix_len)
    if self.head_dim is None:
      _common.check_divisible("d_model", self.d_model, "num_heads", self.num_heads)
      head_dim = self.d_model // self.num_heads
    else:
      head_dim = self.head_dim
    return ops.feature_maps.output_dim(self.feature_map, self.feature_dim), head_dim

  def init_state(self, batch_size: int, dtype=None):
    """``(S [B, H, K, V], z [B, H, K], position [B] int32)``, zeros.

    ``position`` counts the tokens of the current document seen so far, so a
    later call knows whether it is still inside the prefix. ``dtype`` is
    accepted for the mixer protocol; the state is float32.
    """
    del dtype
    mapped_dim, head_dim = self._dims()
    return (jnp.zeros((batch_size, self.num_heads, mapped_dim, head_dim), jnp.float32),
            jnp.zeros((batch_size, self.num_heads, mapped_dim), jnp.float32),
            jnp.zeros((batch_size,), jnp.int32))

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs prefix linear attention over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: ``(S, z, position)`` from ``init_state`` or a previous call; None
        at a sequence start.
      segment_ids: ``[B, T]`` document ids; the state and the position reset
        where the id changes, and every document has its own prefix.

    Returns:
      ``(y, state)``: ``y`` ``[B, T, D]`` in ``dtype`` and the state after the
      last token.
    """
    _common.check_input(x, self.d_model)
    _, head_dim = self._dims()
    batch, time, _ = x.shape
    if state is None:
      state = self.init_state(batch)
    s, z, position = state
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    axes = ("embed", "heads", "head_dim")
    features = (self.num_heads, self.feature_dim)
    q = _common.dense(features, axes, name="q_proj", **proj)(x)
    k = _common.dense(features, axes, name="k_proj", **proj)(x)
    v = _common.dense((self.num_heads, head_dim), axes, name="v_proj", **proj)(x)
    k_enc = _common.dense(features, axes, name="k_enc_proj", **proj)(x)
    v_enc = _common.dense((self.num_heads, head_dim), axes, name="v_enc_proj", **proj)(x)

    phi = ops.feature_maps.get(self.feature_map)
    f32 = lambda a: a.astype(jnp.float32)
    with_ones = lambda a: jnp.concatenate([f32(a), jnp.ones_like(f32(a[..., :1]))], -1)
    positions = _checks.document_positions(position, segment_ids, time)
    in_prefix = (positions < self.prefix_len)[:, :, None, None]
    phi_q = phi(f32(q))
    common = dict(scale=1.0, segment_ids=segment_ids, chunk_size=self.chunk_size)

    decoder, s_dec = ops.linear_attention(
        phi_q, phi(f32(k)), with_ones(v),
        initial_state=jnp.concatenate([s, z[..., None]], -1), **common)
    encoder, s_enc = ops.linear_attention(
        phi_q, phi(f32(k_enc)) * in_prefix, with_ones(v_enc), causal=False, **common)
    total = decoder + encoder
    o = total[..., :head_dim] / (total[..., head_dim:] + _EPS)
    y = _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                      name="o_proj", **proj)(o.astype(self.dtype))
    s_new = s_dec + s_enc
    return y, (s_new[..., :head_dim], s_new[..., head_dim], positions[:, -1] + 1)
