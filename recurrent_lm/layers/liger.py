"""Liger (Lan et al. 2025): pretrained softmax attention turned into gated
linear attention, with no new parameters.

The projections are those of :class:`~recurrent_lm.layers.Attention` (same
names, shapes and logical axes), so a pretrained attention's weights load
1:1. Per head, with ``q = W_q x`` ``[B, T, H, d]`` and ``k = W_k x``,
``v = W_v x`` ``[B, T, H_kv, d]`` (a key/value head serves ``H / H_kv``
query heads, as in grouped-query attention)::

    φ(u)        = softmax(u) over the d channels of a head        feature map
    log_decay_t = logσ(k_t) / 16                                   [d], ≤ 0
    S_t         = diag(exp(log_decay_t)) S_{t−1} + φ(k_t) v_tᵀ     [d, d]
    o_lin_t     = φ(q_t)ᵀ S_t                                      scale 1, no norm

The forget gate reuses the *raw* key projection (before φ and before any
rotary embedding): Liger's reference builds it as an average pooling of
``k`` down to ``H_kv·d`` channels, which is ``k`` itself.

* :class:`LigerGLA` — the gated recurrent layer alone: ``y = W_o o_lin``.
* :class:`LigerAttention` — Liger Attention, an intra-layer hybrid::

      o = ½ · SWA_w(q, k, v) + ½ · o_lin,    y = W_o o

  where ``SWA_w`` is causal softmax attention (scale ``d^{−1/2}``) over the
  last ``w`` tokens, the query itself included. With ``rope_theta`` set,
  rotary embeddings rotate the q and k of the SWA branch only; the linear
  branch always reads unrotated q and k.

With ``lora_rank = r > 0`` the q/k/v projections get a LoRA delta
``(x A) B · alpha / r`` (``A`` ``[D, r]`` random, ``B`` ``[r, H, d]`` zero;
see :class:`~recurrent_lm.layers._common.LoRA`) in the scopes ``q_proj_lora``,
``k_proj_lora``, ``v_proj_lora``: at initialisation the layer equals its
LoRA-free self exactly. Liger fine-tunes only these deltas.

States (float32 recurrence, fixed shapes): ``S`` ``[B, H, d, d]`` for
:class:`LigerGLA`; ``(KVCache of w slots, S)`` for :class:`LigerAttention`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common

# Liger Attention's weights of the softmax-window and linear branches.
_SWA_WEIGHT = 0.5
_LINEAR_WEIGHT = 0.5


class LigerGLA(nn.Module):
  """Liger's gated linear attention over a pretrained attention's q/k/v/o
  (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: query heads H.
    head_dim: width per head d; ``d_model // num_heads`` if None.
    num_kv_heads: key/value heads H_kv (divides H); ``num_heads`` if None.
    use_bias: biases on the q/k/v/o projections (as in ``Attention``).
    gate_logit_normalizer: divisor of ``logσ(k)`` in the log-decay (16).
    chunk_size: chunk length of the chunked linear-attention op.
    lora_rank: rank r of the LoRA deltas on q/k/v; 0 for none.
    lora_alpha: the deltas are scaled by ``lora_alpha / lora_rank``.
    dtype: compute dtype of the projections and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int
  head_dim: int | None = None
  num_kv_heads: int | None = None
  use_bias: bool = False
  gate_logit_normalizer: float = 16.0
  chunk_size: int = 64
  lora_rank: int = 0
  lora_alpha: float = 8.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int]:
    """``(head_dim, num_kv_heads)`` after defaults, validated."""
    head_dim, num_kv_heads = _common.attention_head_dims(
        self.d_model, self.num_heads, self.head_dim, self.num_kv_heads)
    if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      raise ValueError(f"lora_rank={self.lora_rank!r}; expected an int >= 0 (0: no LoRA)")
    if not self.gate_logit_normalizer > 0:
      raise ValueError(
          f"gate_logit_normalizer={self.gate_logit_normalizer}; expected > 0")
    return head_dim, num_kv_heads

  def _linear_state(self, batch_size: int):
    head_dim, _ = self._dims()
    return jnp.zeros((batch_size, self.num_heads, head_dim, head_dim), jnp.float32)

  def init_state(self, batch_size: int, dtype=None):
    """``S`` ``[B, H, d, d]`` zeros, float32; ``dtype`` is accepted for the protocol."""
    del dtype
    return self._linear_state(batch_size)

  def _qkv(self, x):
    """The q/k/v projections (with their LoRA deltas): ``[B, T, H|H_kv, d]``."""
    head_dim, num_kv_heads = self._dims()
    return _common.attention_qkv(
        x, num_heads=self.num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias,
        lora_rank=self.lora_rank, lora_alpha=self.lora_alpha)

  def _linear_branch(self, q, k, v, state, segment_ids):
    """``o_lin`` ``[B, T, H, d]`` float32 and the new ``S``, from unrotated q, k, v."""
    group = self.num_heads // k.shape[2]
    f32 = lambda a: a.astype(jnp.float32)
    phi_q = ops.feature_maps.softmax(f32(q))
    phi_k = ops.feature_maps.softmax(f32(k))
    log_decay = jax.nn.log_sigmoid(f32(k)) / self.gate_logit_normalizer
    if group > 1:
      phi_k, log_decay, v = (jnp.repeat(a, group, axis=2) for a in (phi_k, log_decay, v))
    return ops.linear_attention(phi_q, phi_k, v, log_decay=log_decay, scale=1.0,
                                initial_state=state, segment_ids=segment_ids,
                                chunk_size=self.chunk_size)

  def _out(self, o):
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    return _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                         name="o_proj", **proj)(o.astype(self.dtype))

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs Liger's gated linear attention over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: ``S`` ``[B, H, d, d]`` float32, or None at a sequence start.
      segment_ids: ``[B, T]`` document ids; the state resets where the id changes.

    Returns:
      ``(y, S)``: ``y`` ``[B, T, D]`` in ``dtype`` and the state after the last token.
    """
    _common.check_input(x, self.d_model)
    q, k, v = self._qkv(x)
    o, state = self._linear_branch(q, k, v, state, segment_ids)
    return self._out(o), state


class LigerAttention(LigerGLA):
  """Liger Attention: ``½ · SWA + ½ · gated linear attention`` over a
  pretrained attention's q/k/v/o (module docstring for the equations).

  Attributes (beyond :class:`LigerGLA`'s):
    window: w, keys the SWA branch of a query sees, itself included (64).
    rope_theta: rotary base θ of the SWA branch; None for no rotary embedding
      (the linear branch never rotates).
  """
  window: int = 64
  rope_theta: float | None = None

  def _dims(self) -> tuple[int, int]:
    head_dim, num_kv_heads = super()._dims()
    if not isinstance(self.window, int) or self.window < 1:
      raise ValueError(f"window={self.window!r}; expected a positive int")
    if self.rope_theta is not None and head_dim % 2:
      raise ValueError(f"head_dim={head_dim} is odd; rotary embeddings need an even head_dim")
    return head_dim, num_kv_heads

  def _cache(self, batch_size: int, dtype=None) -> ops.KVCache:
    head_dim, num_kv_heads = self._dims()
    return ops.init_kv_cache(batch_size, self.window, num_kv_heads, head_dim,
                             dtype=self.dtype if dtype is None else dtype)

  def init_state(self, batch_size: int, dtype=None):
    """``(KVCache of window slots, S [B, H, d, d] float32)``, both empty.

    Args:
      batch_size: B.
      dtype: dtype of the cached keys and values; ``self.dtype`` if None.
    """
    return self._cache(batch_size, dtype), self._linear_state(batch_size)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs Liger Attention over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: ``(cache, S)`` from ``init_state`` or a previous call, or None
        at a sequence start.
      segment_ids: ``[B, T]`` document ids: the window sees its own document
        only and ``S`` resets where the id changes.

    Returns:
      ``(y, (cache, S))``: ``y`` ``[B, T, D]`` in ``dtype`` and the state
      after the last token.
    """
    _common.check_input(x, self.d_model)
    q, k, v = self._qkv(x)
    cache, linear_state = (None, None) if state is None else state
    o_lin, linear_state = self._linear_branch(q, k, v, linear_state, segment_ids)

    q_swa, k_swa = q, k
    if self.rope_theta is not None:
      start = 0 if cache is None else cache.index
      positions = start + jnp.arange(x.shape[1])
      q_swa = _common.rotate(q, positions, self.rope_theta)
      k_swa = _common.rotate(k, positions, self.rope_theta)
    if cache is None:
      # As in Attention: the op's fast path, then the cache filled for whoever continues.
      o_swa, _ = ops.softmax_attention(q_swa, k_swa, v, window=self.window,
                                       segment_ids=segment_ids)
      cache = ops.write_kv_cache(self._cache(x.shape[0]), k_swa, v, segment_ids)
    else:
      o_swa, cache = ops.softmax_attention(q_swa, k_swa, v, window=self.window,
                                           segment_ids=segment_ids, cache=cache)

    o = _SWA_WEIGHT * o_swa.astype(jnp.float32) + _LINEAR_WEIGHT * o_lin
    return self._out(o), (cache, linear_state)
