"""Attention against a direct masked-softmax computation, and its cache sizes."""

import jax
import numpy as np
import pytest

from recurrent_lm import layers
from tests.layers._util import assert_close, params_of, perturb, to_numpy

D = 32


def _rotary(x, theta):
  """Rotates channel pairs ``(c, c + d/2)`` as complex numbers by ``t · θ^{−2c/d}``."""
  half = x.shape[-1] // 2
  angle = np.arange(x.shape[1])[:, None] * theta ** (-2 * np.arange(half) / x.shape[-1])
  rotated = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)[None, :, None, :]
  return np.concatenate([rotated.real, rotated.imag], -1)


def _reference(p, x, num_heads, window, theta):
  """``o_i = Σ_{i−w<j≤i} softmax_j(q_i·k_j/√d) v_j`` with query head h reading kv head h·H_kv/H."""
  def heads(name):
    return np.einsum("btd,dhk->bthk", x, p[name]["kernel"]) + p[name]["bias"]

  q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
  if theta is not None:
    q, k = _rotary(q, theta), _rotary(k, theta)
  group = num_heads // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  time = x.shape[1]
  i, j = np.arange(time)[:, None], np.arange(time)[None, :]
  visible = (j <= i) & ((i - j < window) if window else True)
  logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(visible, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  o = np.einsum("bhij,bjhd->bihd", weights, v)
  return np.einsum("bthd,hde->bte", o, p["o_proj"]["kernel"]) + p["o_proj"]["bias"]


@pytest.mark.parametrize("window, theta", [(None, 10_000.0), (4, 100.0)],
                         ids=["full_rotary", "window_rotary"])
def test_matches_masked_softmax_attention_with_grouped_kv_heads(window, theta):
  model = layers.Attention(D, num_heads=4, num_kv_heads=2, window=window, rope_theta=theta,
                           use_bias=True, max_len=16)
  x = jax.random.normal(jax.random.key(0), (2, 11, D))
  params = perturb(params_of(model, x))
  y, _ = jax.jit(model.apply)(params, x)
  y_ref = _reference(to_numpy(params), np.asarray(x, np.float64), 4, window, theta)
  assert_close(y, y_ref, 1e-5, "y")


def test_cache_holds_max_len_tokens_for_full_attention_and_window_tokens_for_a_window():
  full = layers.Attention(D, num_heads=4, num_kv_heads=2, max_len=100).init_state(3)
  windowed = layers.Attention(D, num_heads=4, window=7, max_len=100).init_state(3)
  assert full.k.shape == (3, 100, 2, 8)
  assert windowed.k.shape == (3, 7, 4, 8)


def test_rotary_needs_an_even_head_dim():
  model = layers.Attention(D, num_heads=4, head_dim=5, rope_theta=10_000.0)
  with pytest.raises(ValueError, match="head_dim=5 is odd"):
    model.init_state(1)
