"""LigerGLA and LigerAttention against a token-by-token reference of Liger's equations.

The reference (:func:`_reference`) is written once over an array module: in
numpy float64 it is the specification the layers must match to 1e-5 of the
output scale; in JAX float32 (a ``lax.scan`` over tokens) it checks the
chunked layer's gradients to 1e-4. Stated tolerances are relative to the
largest magnitude of the expected array (``assert_close``).
"""

import functools

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from recurrent_lm import layers
from recurrent_lm.layers.liger import LigerAttention, LigerGLA
from tests.layers._util import (assert_close, assert_trees_close, params_of, perturb,
                                to_numpy)

D = 32
HEADS, KV_HEADS = 4, 2
RANK, ALPHA = 2, 3.0


def _softmax(xp, x):
  e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
  return e / xp.sum(e, axis=-1, keepdims=True)


def _rotary(xp, x, theta):
  """Rotates channel pairs ``(c, c + d/2)`` by the angle ``t · θ^{−2c/d}`` at position t."""
  half = x.shape[-1] // 2
  angle = xp.arange(x.shape[1])[:, None] * theta ** (-2 * xp.arange(half) / x.shape[-1])
  cos, sin = xp.cos(angle)[None, :, None], xp.sin(angle)[None, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _recurrence(xp, phi_q, phi_k, v, log_decay, s):
  """``S_t = diag(e^{log_decay_t}) S_{t−1} + φ(k_t) v_tᵀ``, ``o_t = φ(q_t)ᵀ S_t``, per token."""
  def step(s, inputs):
    q_t, k_t, v_t, g_t = inputs
    s = xp.exp(g_t)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
    return s, xp.einsum("bhk,bhkv->bhv", q_t, s)

  if xp is np:
    outs = []
    for t in range(phi_q.shape[1]):
      s, o_t = step(s, (phi_q[:, t], phi_k[:, t], v[:, t], log_decay[:, t]))
      outs.append(o_t)
    return np.stack(outs, 1), s
  s, outs = lax.scan(step, s, tuple(jnp.moveaxis(a, 1, 0) for a in (phi_q, phi_k, v, log_decay)))
  return jnp.moveaxis(outs, 0, 1), s


def _reference(xp, p, x, s0, *, window=None, theta=None):
  """Liger's layer on ``x`` ``[B, T, D]`` from ``S = s0`` (and an empty window).

  ``window=None`` is LigerGLA (``y = W_o o_lin``); otherwise LigerAttention
  (``y = W_o (½ SWA_window + ½ o_lin)``, rotary on the SWA branch when ``theta``).
  Params may have biases and LoRA deltas ``(x A) B · alpha/rank``.
  """
  def proj(name):
    y = xp.einsum("btd,dhk->bthk", x, p[name]["kernel"])
    if "bias" in p[name]:
      y = y + p[name]["bias"]
    if f"{name}_lora" in p:
      lora = p[f"{name}_lora"]
      y = y + xp.einsum("btr,rhk->bthk", x @ lora["a"]["kernel"],
                        lora["b"]["kernel"]) * (ALPHA / RANK)
    return y

  q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
  group = q.shape[2] // k.shape[2]
  k, v = xp.repeat(k, group, axis=2), xp.repeat(v, group, axis=2)
  log_decay = -xp.logaddexp(0.0, -k) / 16.0                      # logσ(k) / 16
  o, s = _recurrence(xp, _softmax(xp, q), _softmax(xp, k), v, log_decay, s0)
  if window is not None:
    if theta is not None:
      q, k = _rotary(xp, q, theta), _rotary(xp, k, theta)
    time = x.shape[1]
    i, j = np.arange(time)[:, None], np.arange(time)[None, :]
    visible = (j <= i) & (i - j < window)
    logits = xp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    swa = xp.einsum("bhij,bjhd->bihd", _softmax(xp, xp.where(visible, logits, -np.inf)), v)
    o = 0.5 * swa + 0.5 * o
  y = xp.einsum("bthd,hde->bte", o, p["o_proj"]["kernel"])
  if "bias" in p["o_proj"]:
    y = y + p["o_proj"]["bias"]
  return y, s


def _perturb(params, scale=0.1):
  """``perturb`` on the parameters raveled into one vector: one random draw to
  compile instead of one per parameter shape (each costs ~1 s of CPU)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  return unravel(perturb(flat, scale=scale))


def _inputs(shape, seed=0):
  """Standard normal float32 inputs, drawn on the host (nothing to compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# The shared layers: grouped kv heads, biases, LoRA, a window of 4 with rotary,
# chunks of 16 (two sub-chunks of 8) so that T = 21 ends inside a chunk.
BATCH, TIME, WINDOW, THETA = 2, 21, 4, 100.0
KWARGS = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, use_bias=True, chunk_size=16,
              lora_rank=RANK, lora_alpha=ALPHA)
MAKERS = {"liger_gla": lambda **kw: LigerGLA(D, **{**KWARGS, **kw}),
          "liger_attention": lambda **kw: LigerAttention(
              D, window=WINDOW, rope_theta=THETA, **{**KWARGS, **kw})}


@functools.lru_cache(maxsize=None)
def _setup(name):
  """``(model, perturbed params, jitted apply, jitted grad)`` of a shared layer.

  Tests reuse the jitted functions, so equal shapes compile once; perturbed
  params make LoRA's B non-zero and biases non-trivial.
  """
  model = MAKERS[name]()
  params = _perturb(params_of(model, _inputs((BATCH, TIME, D))))
  cotangent = _inputs((BATCH, TIME, D), seed=2)
  grad = jax.jit(jax.value_and_grad(
      lambda p, x: jnp.sum(model.apply(p, x)[0] * cotangent), (0, 1)))
  return model, params, jax.jit(model.apply), grad


@pytest.mark.parametrize("name", list(MAKERS))
def test_matches_a_float64_per_token_reference_with_bias_lora_and_grouped_kv(name):
  _, params, apply, _ = _setup(name)
  x = _inputs((BATCH, TIME, D))
  y, state = apply(params, x)
  s0 = np.zeros((BATCH, HEADS, D // HEADS, D // HEADS))
  window, theta = (None, None) if name == "liger_gla" else (WINDOW, THETA)
  y_ref, s_ref = _reference(np, to_numpy(params), np.asarray(x, np.float64), s0,
                            window=window, theta=theta)
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(state if name == "liger_gla" else state[1], s_ref, 1e-5, "S")


def test_chunked_layer_matches_a_token_scan_in_value_and_gradients():
  _, params, _, grad = _setup("liger_attention")
  x = _inputs((BATCH, TIME, D))
  cotangent = _inputs(x.shape, seed=2)
  s0 = jnp.zeros((BATCH, HEADS, D // HEADS, D // HEADS))

  def loss_scan(p, x):
    y, _ = _reference(jnp, p["params"], x, s0, window=WINDOW, theta=THETA)
    return jnp.sum(y * cotangent)

  value, grads = grad(params, x)
  value_ref, grads_ref = jax.jit(jax.value_and_grad(loss_scan, (0, 1)))(params, x)
  assert_close(value, value_ref, 1e-4, "loss")
  assert_trees_close(grads, grads_ref, 1e-4, "grad")


def _pieces(time, rng):
  """Random consecutive pieces of ``range(time)`` of lengths 1 or 5."""
  pieces, start = [], 0
  while start < time:
    length = min(int(rng.choice([1, 5])), time - start)
    pieces.append(slice(start, start + length))
    start += length
  return pieces


def _run_in_pieces(name, x, pieces):
  model, params, apply, _ = _setup(name)
  state, ys = model.init_state(x.shape[0]), []
  for piece in pieces:
    y, state = apply(params, x[:, piece], state)
    ys.append(y)
  return jnp.concatenate(ys, 1), state


@pytest.mark.parametrize("name", list(MAKERS))
def test_pieces_with_carried_state_equal_one_call(name):
  _, params, apply, _ = _setup(name)
  x = _inputs((BATCH, TIME, D))   # pieces cross chunk (16) and window (4) boundaries
  y_full, state_full = apply(params, x)
  y, state = _run_in_pieces(name, x, _pieces(TIME, np.random.default_rng(0)))
  assert_close(y, y_full, 1e-5, "pieces y")
  assert_trees_close(state, state_full, 1e-5, "pieces state")


def test_packed_rows_equal_their_documents_run_separately():
  _, params, apply, _ = _setup("liger_attention")
  # Row 0 holds documents of lengths 5, 1, 10, 5; row 1 of lengths 10, 5, 1, 5.
  # Documents of equal length from the two rows run side by side, in pieces of 5 or 1.
  lengths = [[5, 1, 10, 5], [10, 5, 1, 5]]
  segment_ids = jnp.asarray([np.repeat([3, 4, 9, 2], lengths[0]),
                             np.repeat([0, 1, 2, 3], lengths[1])], jnp.int32)
  x = _inputs((BATCH, TIME, D))
  y_packed, state_packed = apply(params, x, segment_ids=segment_ids)
  starts = np.cumsum([[0] + row[:-1] for row in lengths], axis=1)
  for doc_0, doc_1 in [(0, 1), (1, 2), (2, 0), (3, 3)]:
    length = lengths[0][doc_0]
    take = lambda a: jnp.stack([a[0, starts[0][doc_0]:starts[0][doc_0] + length],
                                a[1, starts[1][doc_1]:starts[1][doc_1] + length]])
    pieces = [slice(s, min(s + 5, length)) for s in range(0, length, 5)]
    y_docs, state_docs = _run_in_pieces("liger_attention", take(x), pieces)
    assert_close(take(y_packed), y_docs, 1e-5, f"documents {doc_0} and {doc_1}")
  # The state after a packed row continues the row's last document.
  x_next = _inputs((BATCH, 1, D), seed=5)
  y_cont, _ = apply(params, x_next, state_packed, segment_ids=segment_ids[:, -1:])
  y_cont_docs, _ = apply(params, x_next, state_docs)
  assert_close(y_cont, y_cont_docs, 1e-5, "continuation")


def test_lora_starts_as_the_frozen_projection_and_only_b_gets_a_first_gradient():
  _, params, apply, grad = _setup("liger_attention")
  # B = 0, as LoRA initialises it; every other parameter stays perturbed.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if "'b'" in jax.tree_util.keystr(path) else p,
      params)
  frozen = MAKERS["liger_attention"](lora_rank=0)
  base = {"params": {k: v for k, v in params["params"].items() if "lora" not in k}}
  assert set(params["params"]) - set(base["params"]) == {
      "q_proj_lora", "k_proj_lora", "v_proj_lora"}
  x = _inputs((BATCH, TIME, D))
  y_lora, _ = apply(params, x)
  y_frozen, _ = jax.jit(frozen.apply)(base, x)
  np.testing.assert_allclose(np.asarray(y_lora), np.asarray(y_frozen), rtol=0, atol=1e-6)

  _, (grads, _) = grad(params, x)
  for name in ("q_proj_lora", "k_proj_lora", "v_proj_lora"):
    g = grads["params"][name]
    assert float(jnp.max(jnp.abs(g["b"]["kernel"]))) > 0, f"{name}: B has no gradient"
    assert float(jnp.max(jnp.abs(g["a"]["kernel"]))) == 0, f"{name}: A moves while B = 0"


def test_params_are_attentions_with_the_same_names_shapes_and_logical_axes_plus_lora():
  x = _inputs((1, 3, D))
  names = lambda tree: jax.tree_util.tree_map(
      lambda b: (b.value.shape, b.names), tree,
      is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  attention = layers.Attention(D, num_heads=HEADS, num_kv_heads=KV_HEADS, use_bias=True)
  expected = names(jax.eval_shape(attention.init, jax.random.key(0), x)["params"])
  for make in MAKERS.values():
    got = names(jax.eval_shape(make().init, jax.random.key(0), x)["params"])
    assert {k: v for k, v in got.items() if "lora" not in k} == expected
    lora = got["q_proj_lora"]
    assert lora["a"]["kernel"] == ((D, RANK), ("embed", None))
    assert lora["b"]["kernel"] == ((RANK, HEADS, D // HEADS), (None, "heads", "head_dim"))


def test_decoding_100k_tokens_keeps_the_state_finite():
  # softmax(k) sums to 1 and every decay is ≤ 1, so Σ_k |S_kv| ≤ Σ_t |v_t|: bounded growth.
  model = LigerAttention(8, num_heads=2, window=4, lora_rank=2)
  x = 3.0 * _inputs((1, 100_000, 8), seed=3)
  params = _perturb(params_of(model, x[:, :4]), scale=0.5)

  @jax.jit
  def decode(params, x):
    def step(state, x_t):
      y, state = model.apply(params, x_t[:, None], state)
      return state, y[:, 0]
    return lax.scan(step, model.init_state(1), jnp.moveaxis(x, 1, 0))

  (cache, s), y = decode(params, x)
  assert np.isfinite(np.asarray(s)).all() and np.isfinite(np.asarray(y)).all()
  assert np.isfinite(np.asarray(cache.k)).all() and int(cache.index) == 100_000
  v = jnp.einsum("btd,dhk->bthk", x, params["params"]["v_proj"]["kernel"])
  assert float(jnp.max(jnp.sum(jnp.abs(s), axis=2))) <= float(jnp.sum(jnp.abs(v))) * (1 + 1e-5)


def test_bfloat16_compute_stays_within_2_percent_of_float32():
  _, params, apply, _ = _setup("liger_attention")
  x = _inputs((BATCH, TIME, D))
  y32, (_, s32) = apply(params, x)
  bf16 = MAKERS["liger_attention"](dtype=jnp.bfloat16)
  y16, (cache16, s16) = jax.jit(bf16.apply)(params, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16 and cache16.k.dtype == jnp.bfloat16
  assert s16.dtype == jnp.float32
  assert_close(y16.astype(jnp.float32), y32, 2e-2, "bf16 y")   # measured 7e-3
  assert_close(s16, s32, 2e-2, "bf16 S")                      # measured 8e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0), r"window=0; expected a positive int"),
    (dict(head_dim=5, rope_theta=1e4), r"head_dim=5 is odd"),
    (dict(lora_rank=-1), r"lora_rank=-1; expected an int >= 0"),
    (dict(num_kv_heads=3), r"num_heads=4 is not divisible by num_kv_heads=3"),
])
def test_bad_settings_raise_clear_errors(kwargs, message):
  model = LigerAttention(D, num_heads=HEADS, **kwargs)
  with pytest.raises(ValueError, match=message):
    model.init_state(1)
