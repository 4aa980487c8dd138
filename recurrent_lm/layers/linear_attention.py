"""Causal linear attention with a feature map, optionally normalised (Based).

Per head, with ``q = W_q x``, ``k = W_k x`` (``feature_dim`` wide), ``v = W_v x``
(``head_dim`` wide), a feature map ``φ`` and ``s`` the ``scale``::

    S_t = S_{t−1} + φ(k_t) v_tᵀ
    o_t = s φ(q_t)ᵀ S_t                                   normalize=False
    z_t = z_{t−1} + φ(k_t)
    o_t = s φ(q_t)ᵀ S_t / (s φ(q_t)ᵀ z_t + ε)            normalize=True
    y_t = W_o [o_t^1; …; o_t^H]

The Based linear-attention layer is ``feature_map="taylor"``,
``feature_dim=16``, ``normalize=True``:
``φ(q)·φ(k) = 1 + q·k/√d′ + (q·k)²/(2d′)``. The feature map, the state and the
denominator are computed in float32 whatever ``dtype``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common


class LinearAttention(nn.Module):
  """Multi-head linear attention (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: heads H.
    feature_dim: per-head width of q and k before the feature map; ``head_dim``
      if None.
    head_dim: per-head width of v; ``d_model // num_heads`` if None.
    feature_map: a name from ``ops.feature_maps``.
    normalize: divide by ``φ(q_t)ᵀ z_t`` (and carry ``z``).
    scale: ``s`` above; None for the op's default, the feature-mapped
      width to the power −1/2.
    chunk_size: chunk length of the chunked op.
    dtype: compute dtype of the projections and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int
  feature_dim: int | None = None
  head_dim: int | None = None
  feature_map: str = "identity"
  normalize: bool = False
  scale: float | None = None
  chunk_size: int = 64
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int, int]:
    """``(feature_dim, mapped feature width, head_dim)`` after defaults."""
    if self.head_dim is None:
      _common.check_divisible("d_model", self.d_model, "num_heads", self.num_heads)
      head_dim = self.d_model // self.num_heads
    else:
      head_dim = self.head_dim
    feature_dim = head_dim if self.feature_dim is None else self.feature_dim
    return feature_dim, ops.feature_maps.output_dim(self.feature_map, feature_dim), head_dim

  def init_state(self, batch_size: int, dtype=None):
    """Zeros: ``S`` ``[B, H, K, V]``, or ``(S, z [B, H, K])`` when ``normalize``.

    ``K`` is the feature-mapped width. The state is float32 always;
    ``dtype`` is accepted for the mixer protocol.
    """
    del dtype
    _, mapped_dim, head_dim = self._dims()
    s = jnp.zeros((batch_size, self.num_heads, mapped_dim, head_dim), jnp.float32)
    if not self.normalize:
      return s
    return s, jnp.zeros((batch_size, self.num_heads, mapped_dim), jnp.float32)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs linear attention over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: as returned by ``init_state`` or a previous call; None at a
        sequence start.
      segment_ids: ``[B, T]`` document ids; the state resets where the id changes.

    Returns:
      ``(y, state)``: ``y`` ``[B, T, D]`` in ``dtype`` and the state after the
      last token.
    """
    _common.check_input(x, self.d_model)
    feature_dim, _, head_dim = self._dims()
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = _common.dense((self.num_heads, feature_dim), ("embed", "heads", "head_dim"),
                      name="q_proj", **proj)(x)
    k = _common.dense((self.num_heads, feature_dim), ("embed", "heads", "head_dim"),
                      name="k_proj", **proj)(x)
    v = _common.dense((self.num_heads, head_dim), ("embed", "heads", "head_dim"),
                      name="v_proj", **proj)(x)
    phi = ops.feature_maps.get(self.feature_map)
    o, state = ops.linear_attention(
        phi(q.astype(jnp.float32)), phi(k.astype(jnp.float32)), v.astype(jnp.float32),
        normalize=self.normalize, scale=self.scale, initial_state=state,
        segment_ids=segment_ids, chunk_size=self.chunk_size)
    y = _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                      name="o_proj", **proj)(o.astype(self.dtype))
    return y, state
