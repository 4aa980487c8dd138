"""Gated linear attention (GLA, Yang et al. 2023), the layer of flash-linear-attention.

Per head, with ``q, k ∈ R^K`` (``K = expand_k·D / H``), ``v, g ∈ R^V``
(``V = expand_v·D / H``) projections of ``x_t`` and a low-rank
per-key-channel forget gate::

    log_decay_t = logσ(W_2 W_1 x_t + b_2) / gate_logit_normalizer     [K], ≤ 0
    S_t = diag(exp(log_decay_t)) S_{t−1} + k_t v_tᵀ
    o_t = K^{−1/2} q_tᵀ S_t
    y_t = W_o [RMSNorm(o_t^h) ⊙ swish(g_t^h)]_h

``W_1`` (D → ``gate_low_rank_dim``) has no bias, ``W_2`` has. The RMSNorm
normalises each head separately with one ``scale`` ``[V]`` shared by all heads.
Dividing the gate's logits by the normaliser (16) keeps the decays close to 1
at initialisation, so the state remembers long contexts from the start.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm import ops
from recurrent_lm.layers import _common
from recurrent_lm.layers.norms import GatedRMSNorm


class GatedLinearAttention(nn.Module):
  """Multi-head gated linear attention (module docstring for the equations).

  Attributes:
    d_model: model width D.
    num_heads: heads H.
    expand_k: q/k width over D.
    expand_v: v width over D.
    gate_low_rank_dim: rank of the forget-gate projection.
    gate_logit_normalizer: divisor of ``logσ`` in the log-decay.
    norm_eps: ε of the output RMSNorm.
    chunk_size: chunk length of the chunked op.
    dtype: compute dtype of the projections and the output.
    param_dtype: dtype of the parameters.
  """
  d_model: int
  num_heads: int = 4
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  norm_eps: float = 1e-5
  chunk_size: int = 64
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dims(self) -> tuple[int, int]:
    """Per-head ``(K, V)``."""
    key_dim = int(self.d_model * self.expand_k)
    value_dim = int(self.d_model * self.expand_v)
    _common.check_divisible("key width d_model*expand_k", key_dim, "num_heads", self.num_heads)
    _common.check_divisible("value width d_model*expand_v", value_dim, "num_heads",
                            self.num_heads)
    return key_dim // self.num_heads, value_dim // self.num_heads

  def init_state(self, batch_size: int, dtype=None):
    """``S`` ``[B, H, K, V]`` zeros, float32; ``dtype`` is accepted for the protocol."""
    del dtype
    key_dim, value_dim = self._dims()
    return jnp.zeros((batch_size, self.num_heads, key_dim, value_dim), jnp.float32)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    """Runs GLA over ``x``.

    Args:
      x: ``[B, T, D]``.
      state: ``S`` ``[B, H, K, V]`` float32, or None at a sequence start.
      segment_ids: ``[B, T]`` document ids; the state resets where the id changes.

    Returns:
      ``(y, S)``: ``y`` ``[B, T, D]`` in ``dtype`` and the state after the last token.
    """
    _common.check_input(x, self.d_model)
    key_dim, value_dim = self._dims()
    heads = self.num_heads
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = _common.dense((heads, key_dim), ("embed", "heads", "head_dim"), name="q_proj", **proj)(x)
    k = _common.dense((heads, key_dim), ("embed", "heads", "head_dim"), name="k_proj", **proj)(x)
    v = _common.dense((heads, value_dim), ("embed", "heads", "head_dim"), name="v_proj",
                      **proj)(x)
    g = _common.dense((heads, value_dim), ("embed", "heads", "head_dim"), name="g_proj",
                      **proj)(x)
    gate = _common.dense(self.gate_low_rank_dim, ("embed", None), name="gk_down", **proj)(x)
    gate = _common.dense((heads, key_dim), (None, "heads", "head_dim"), use_bias=True,
                         name="gk_up", **proj)(gate)
    log_decay = jax.nn.log_sigmoid(gate.astype(jnp.float32)) / self.gate_logit_normalizer
    o, state = ops.linear_attention(
        q, k, v, log_decay=log_decay, scale=key_dim ** -0.5, initial_state=state,
        segment_ids=segment_ids, chunk_size=self.chunk_size)
    o = GatedRMSNorm(norm_before_gate=True, eps=self.norm_eps, axis_name="head_dim",
                     dtype=self.dtype, param_dtype=self.param_dtype, name="g_norm")(o, g)
    y = _common.dense(self.d_model, ("heads", "head_dim", "embed"), axis=(-2, -1),
                      name="o_proj", **proj)(o)
    return y, state
