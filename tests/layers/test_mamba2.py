"""Mamba-2 against a per-token loop of its SSM equations, its initialisation,
and its state-collapse mitigations (Stuffed Mamba) against their equations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from recurrent_lm import layers
from tests.layers._util import (
    assert_close, assert_trees_close, params_of, perturb, silu, to_numpy)

D = 32


def _front(p, x, m: layers.Mamba2):
  """The block around the SSM, before it: projections, causal conv + SiLU, Δ.

  Returns ``(z, xs [B, T, H, P], B [B, T, G, N], C, Δ [B, T, H], padded conv input)``.
  """
  batch, time, _ = x.shape
  inner = m.expand * D
  heads, n, groups, width = inner // m.head_dim, m.d_state, m.n_groups, m.conv_width
  z = x @ p["z_proj"]["kernel"]
  xbc = x @ p["xbc_proj"]["kernel"]
  dt = x @ p["dt_proj"]["kernel"]
  padded = np.concatenate([np.zeros((batch, width - 1, xbc.shape[-1])), xbc], 1)
  conv = sum(p["conv_weight"][i] * padded[:, i:i + time] for i in range(width))
  u = silu(conv + p["conv_bias"])
  xs = u[..., :inner].reshape(batch, time, heads, m.head_dim)
  b = u[..., inner:inner + groups * n].reshape(batch, time, groups, n)
  c = u[..., inner + groups * n:].reshape(batch, time, groups, n)
  return z, xs, b, c, np.logaddexp(0, dt + p["dt_bias"]), padded


def _output(p, y, z, m: layers.Mamba2):
  """After the SSM: ``W_out RMSNorm_G(y ⊙ SiLU(z))``."""
  batch, time = y.shape[:2]
  inner = m.expand * D
  gated = (y.reshape(batch, time, inner) * silu(z)).reshape(batch, time, m.n_groups, -1)
  normed = gated / np.sqrt(np.mean(gated ** 2, -1, keepdims=True) + m.norm_eps)
  return (normed.reshape(batch, time, inner) * p["norm"]["scale"]) @ p["out_proj"]["kernel"]


def _reference(p, x, m: layers.Mamba2):
  """Per token: ``h = exp(ΔA) h + Δ x Bᵀ``, ``y = h C + D x``, then the gated norm."""
  batch, time, _ = x.shape
  heads, n, groups = m.expand * D // m.head_dim, m.d_state, m.n_groups
  z, xs, b, c, delta, padded = _front(p, x, m)
  a = -np.exp(p["A_log"])
  h = np.zeros((batch, heads, m.head_dim, n))
  y = np.zeros((batch, time, heads, m.head_dim))
  for t in range(time):
    for head in range(heads):
      g = head // (heads // groups)
      step = delta[:, t, head, None, None]
      h[:, head] = (np.exp(step * a[head]) * h[:, head]
                    + step * xs[:, t, head, :, None] * b[:, t, g, None, :])
      y[:, t, head] = (np.einsum("bpn,bn->bp", h[:, head], c[:, t, g])
                       + p["D"][head] * xs[:, t, head])
  out = _output(p, y, z, m)
  return out, (padded[:, -(m.conv_width - 1):], h.transpose(0, 1, 3, 2))


def test_matches_a_per_token_loop_of_the_ssm_equations():
  model = layers.Mamba2(D, d_state=4, head_dim=8, n_groups=2, conv_width=3, chunk_size=4)
  x = jax.random.normal(jax.random.key(0), (2, 11, D))
  params = perturb(params_of(model, x))
  y, (conv_state, ssm_state) = jax.jit(model.apply)(params, x)
  y_ref, (conv_ref, ssm_ref) = _reference(to_numpy(params), np.asarray(x, np.float64), model)
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(conv_state, conv_ref, 1e-5, "conv state")
  assert_close(ssm_state, ssm_ref, 1e-5, "ssm state")


def test_init_draws_dt_log_uniformly_in_range_and_a_in_1_to_16_with_d_one():
  model = layers.Mamba2(256, d_state=4, head_dim=2)  # 256 heads to see the ranges
  params = params_of(model, jnp.ones((1, 1, 256)))["params"]
  dt = jax.nn.softplus(params["dt_bias"])
  a = jnp.exp(params["A_log"])
  assert bool(jnp.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))))
  # log-uniform: the median of log dt sits mid-way between log 1e-3 and log 0.1.
  assert abs(float(jnp.median(jnp.log10(dt))) + 2.0) < 0.25
  assert bool(jnp.all((a >= 1.0) & (a <= 16.0)))
  assert float(a.max() - a.min()) > 10.0
  np.testing.assert_array_equal(params["D"], np.ones(256))


def test_state_is_the_last_conv_inputs_and_a_float32_ssm_state():
  conv_state, ssm_state = layers.Mamba2(D, d_state=4, head_dim=8, n_groups=2).init_state(
      3, jnp.bfloat16)
  assert conv_state.shape == (3, 3, 2 * D + 2 * 2 * 4) and conv_state.dtype == jnp.bfloat16
  assert ssm_state.shape == (3, 2 * D // 8, 4, 8) and ssm_state.dtype == jnp.float32


# --- State-collapse mitigations (Stuffed Mamba): inference switches, off by default ---
#
# Every test below applies the plain block's parameters, and shares one jitted
# apply per switch with fixed shapes (T = 11 split as 5 + 1 + 5), so the whole
# section compiles four small programs per switch.

_SMALL = dict(d_state=4, head_dim=8, n_groups=2, conv_width=3, chunk_size=4)  # H = 8
MITIGATIONS = {
    "forget_more": dict(a_scale=2.0, delta_scale=1.5, b_scale=0.5, decay_mult=0.9),
    # One τ per head; the 9.0 never binds.
    "state_norm": dict(state_norm_threshold=(0.01, 0.02, 0.03, 0.05, 0.2, 0.02, 0.01, 9.0)),
    # r = 3 below the 5-token pieces and documents, above the 1-token ones.
    "window": dict(state_window=3, a_scale=0.5, decay_mult=0.8),
}
_TIME, _PIECES = 11, (5, 1, 5)


@functools.lru_cache(maxsize=None)
def _plain_params():
  return perturb(params_of(layers.Mamba2(D, **_SMALL), jnp.zeros((1, 1, D))))


@functools.lru_cache(maxsize=None)
def _mitigated(name):
  """``(model, params of the plain block, jitted apply)``."""
  model = layers.Mamba2(D, **_SMALL, **MITIGATIONS[name])
  return model, _plain_params(), jax.jit(model.apply)


def _mitigated_reference(p, x, m):
  """Float64, per token and head, each switch by its defining equation.

  ``A ← a_scale·A``, ``Δ ← delta_scale·Δ``, ``B ← b_scale·B``,
  ``log α = ΔA + log decay_mult``; then ``h = α h + Δ x Bᵀ`` rescaled to
  norm ≤ τ, or (window) ``h_t = Σ_{t−r<i≤t} (Π_{i<s≤t} α_s) Δ_i x_i B_iᵀ``
  summed afresh at every t. Returns ``(out, ssm_state [B, H, N, P], (B, Δx, log α))``.
  """
  batch, time, _ = x.shape
  heads, n, groups = m.expand * D // m.head_dim, m.d_state, m.n_groups
  z, xs, b, c, delta, _ = _front(p, x, m)
  b, delta = b * m.b_scale, delta * m.delta_scale
  log_alpha = delta * (-np.exp(p["A_log"]) * m.a_scale) + np.log(m.decay_mult)  # [B, T, H]
  v = delta[..., None] * xs
  tau = None if m.state_norm_threshold is None else np.broadcast_to(
      np.asarray(m.state_norm_threshold, np.float64), (heads,))
  h = np.zeros((batch, heads, m.head_dim, n))
  y = np.zeros((batch, time, heads, m.head_dim))
  for t in range(time):
    for head in range(heads):
      g = head // (heads // groups)
      if m.state_window is None:
        h[:, head] = (np.exp(log_alpha[:, t, head])[:, None, None] * h[:, head]
                      + v[:, t, head, :, None] * b[:, t, g, None, :])
        if tau is not None:
          norm = np.sqrt(np.sum(h[:, head] ** 2, axis=(-2, -1)))
          h[:, head] *= (tau[head] / np.maximum(norm, tau[head]))[:, None, None]
      else:
        h[:, head] = sum(
            np.exp(log_alpha[:, i + 1:t + 1, head].sum(1))[:, None, None]
            * v[:, i, head, :, None] * b[:, i, g, None, :]
            for i in range(max(0, t - m.state_window + 1), t + 1))
      y[:, t, head] = (np.einsum("bpn,bn->bp", h[:, head], c[:, t, g])
                       + p["D"][head] * xs[:, t, head])
  out = _output(p, y, z, m)
  return out, h.transpose(0, 1, 3, 2), (b, v, log_alpha)


def _run_pieces(model, params, apply, x, state=None):
  """``x`` in pieces of ``_PIECES`` tokens, the state carried."""
  state = model.init_state(x.shape[0]) if state is None else state
  ys, start = [], 0
  for length in _PIECES:
    y, state = apply(params, x[:, start:start + length], state)
    ys.append(y)
    start += length
  return jnp.concatenate(ys, 1), state


@pytest.mark.parametrize("name", list(MITIGATIONS))
def test_mitigation_matches_a_float64_reference_of_its_equations(name):
  model, params, apply = _mitigated(name)
  x = jax.random.normal(jax.random.key(2), (2, _TIME, D))
  y, state = apply(params, x)
  y_ref, ssm_ref, (k_ref, v_ref, g_ref) = _mitigated_reference(
      to_numpy(params), np.asarray(x, np.float64), model)
  assert_close(y, y_ref, 1e-5, "y")
  assert_close(state[1], ssm_ref, 1e-5, "ssm state")
  if model.state_norm_threshold is not None:
    # The normalisation binds: several heads end on their sphere (6 of 16 with
    # these seeds), none outside it.
    tau = np.asarray(model.state_norm_threshold)
    norms = np.sqrt(np.sum(np.asarray(state[1], np.float64) ** 2, axis=(-2, -1)))
    assert np.all(norms <= tau * (1 + 1e-5))
    assert np.sum(np.abs(norms - tau) < 1e-5 * tau) >= 4
  if model.state_window is not None:
    # The ring buffer holds token p in slot p mod r.
    r = model.state_window
    window = state[2]
    assert int(window.slot) == _TIME % r
    slots = np.arange(_TIME - r, _TIME) % r
    assert_close(np.asarray(window.k)[:, slots], k_ref[:, -r:], 1e-5, "window k")
    assert_close(np.asarray(window.v)[:, slots], v_ref[:, -r:], 1e-5, "window v")
    assert_close(np.asarray(window.log_decay)[:, slots], g_ref[:, -r:], 1e-5, "window log α")


@pytest.mark.parametrize("name", list(MITIGATIONS))
def test_mitigation_in_pieces_with_carried_state_equals_one_call(name):
  model, params, apply = _mitigated(name)
  x = jax.random.normal(jax.random.key(3), (2, _TIME, D))
  y_full, state_full = apply(params, x)
  y, state = _run_pieces(model, params, apply, x)
  assert_close(y, y_full, 1e-4, "pieces y")
  assert_trees_close(state, state_full, 1e-4, "pieces state")


@pytest.mark.parametrize("name", list(MITIGATIONS))
def test_mitigation_packed_row_equals_documents_run_separately(name):
  """Documents of ``_PIECES`` tokens in both rows, each run from a fresh state;
  the packed state then continues the last document."""
  model, params, apply = _mitigated(name)
  segment_ids = jnp.asarray(np.repeat([[7, 3, 5], [0, 1, 2]], _PIECES, axis=1), jnp.int32)
  x = jax.random.normal(jax.random.key(6), (2, _TIME, D))
  y_packed, state_packed = apply(params, x, segment_ids=segment_ids)
  start = 0
  for length in _PIECES:
    y_doc, state_doc = apply(params, x[:, start:start + length], model.init_state(2))
    assert_close(y_packed[:, start:start + length], y_doc, 1e-4, f"document at {start}")
    start += length
  assert_close(state_packed[1], state_doc[1], 1e-4, "ssm state")
  # Continue both for 5 tokens (past the window) and 6 more: the buffers agree too.
  x_next = jax.random.normal(jax.random.key(7), (2, _TIME, D))
  y_cont, _ = _run_pieces(model, params, apply, x_next, state_packed)
  y_cont_doc, _ = _run_pieces(model, params, apply, x_next, state_doc)
  assert_close(y_cont, y_cont_doc, 1e-4, "continuation")


def test_mitigations_add_no_params_and_their_off_values_are_the_plain_block():
  x = jnp.zeros((2, _TIME, D))
  plain = layers.Mamba2(D, **_SMALL)
  shapes = lambda m: jax.tree_util.tree_map(
      lambda a: (a.shape, a.dtype), jax.eval_shape(m.init, jax.random.key(0), x))
  for kwargs in MITIGATIONS.values():
    assert shapes(layers.Mamba2(D, **_SMALL, **kwargs)) == shapes(plain)
  off = layers.Mamba2(D, **_SMALL, a_scale=1.0, delta_scale=1.0, b_scale=1.0, decay_mult=1.0,
                      state_norm_threshold=None, state_window=None)
  assert off == plain and len(off.init_state(2)) == 2


def test_state_window_equals_the_plain_block_run_on_only_the_last_r_tokens():
  """The defining property: at every t the output is the plain Mamba-2's on
  tokens max(0, t−r+1) … t from a zero SSM state (the same switches
  otherwise). The W-tap conv is no part of the recurrence: its context, the
  raw conv inputs of the W − 1 tokens before the window, is the conv state."""
  model, params, apply = _mitigated("window")
  r, width = model.state_window, model.conv_width
  plain = layers.Mamba2(D, **_SMALL, **{k: v for k, v in MITIGATIONS["window"].items()
                                        if k != "state_window"})
  plain_apply = jax.jit(plain.apply)
  x = jax.random.normal(jax.random.key(5), (2, _TIME, D))
  y_window, state = apply(params, x)
  conv_inputs = x @ params["params"]["xbc_proj"]["kernel"]
  conv_inputs = jnp.pad(conv_inputs, ((0, 0), (width - 1, 0), (0, 0)))  # zeros before t = 0
  zero = plain.init_state(2)[1]
  y_first, _ = plain_apply(params, x[:, :r], (conv_inputs[:, :width - 1], zero))
  assert_close(y_window[:, :r], y_first, 1e-4, "while the window fills")
  for t in range(r, _TIME):
    first = t - r + 1
    context = conv_inputs[:, first:first + width - 1]
    y_last, plain_state = plain_apply(params, x[:, first:t + 1], (context, zero))
    assert_close(y_window[:, t], y_last[:, -1], 1e-4, f"y at t={t}")
  assert_close(state[1], plain_state[1], 1e-4, "final windowed state")


def test_long_decode_keeps_the_state_bounded_where_the_plain_state_grows():
  """A repeated token (the paper's 'newlines' probe) with A ≈ 0: the plain
  block never forgets and its state grows ∝ t. Decoding 100k tokens one at a
  time, decay_mult bounds it by ‖w‖ / (1 − c) (w = Δ x Bᵀ, the same every
  step), the normalisation by τ, and the window holds exactly r·w — after
  100k subtractions."""
  small = dict(d_state=4, head_dim=8, n_groups=1, conv_width=2, chunk_size=64)
  d, steps, r, c = 8, 100_000, 64, 0.99
  token = jax.random.normal(jax.random.key(8), (1, 1, d))
  plain = layers.Mamba2(d, **small)
  params = params_of(plain, token)
  params["params"]["A_log"] = jnp.full_like(params["params"]["A_log"], -30.0)  # A ≈ −1e-13
  norm = lambda s: float(jnp.max(jnp.sqrt(jnp.sum(jnp.square(s), (-2, -1)))))
  half = jnp.broadcast_to(token, (1, steps // 2, d))
  plain_apply = jax.jit(plain.apply)
  _, state_half = plain_apply(params, half, plain.init_state(1))
  _, state_full = plain_apply(params, half, state_half)
  write = (state_full[1] - state_half[1]) / (steps // 2)  # w, from the second token on
  assert norm(state_full[1]) > 0.99 * steps * norm(write)

  for kwargs, bound in ((dict(decay_mult=c), norm(write) / (1 - c)),
                        (dict(state_norm_threshold=0.5 * norm(write)), 0.5 * norm(write)),
                        (dict(state_window=r), r * norm(write))):
    model = layers.Mamba2(d, **small, **kwargs)
    decode = jax.jit(lambda s, model=model: lax.fori_loop(
        0, steps, lambda _, s: model.apply(params, token, s)[1], s))
    state = decode(model.init_state(1))
    assert bool(jnp.all(jnp.isfinite(state[1]))), kwargs
    assert norm(state[1]) <= bound * (1 + 1e-4), (kwargs, norm(state[1]), bound)
    if "state_window" in kwargs:
      assert_close(state[1], r * write, 1e-4, "window after 100k decode steps")


@pytest.mark.parametrize("kwargs, message", [
    (dict(state_window=0), r"state_window=0; expected a positive int or None"),
    (dict(decay_mult=1.5), r"decay_mult=1.5; expected a float in \(0, 1.0\]"),
    (dict(a_scale=-1.0), r"a_scale=-1.0; expected a finite float > 0"),
    (dict(state_norm_threshold=(1.0, 2.0)),
     r"state_norm_threshold=\(1.0, 2.0\); expected None, a finite float > 0, or a tuple of 8"),
    (dict(state_norm_threshold=1.0, state_window=4),
     r"state_norm_threshold=1.0 with state_window=4; expected at most one of them"),
])
def test_bad_mitigation_values_raise_a_clear_error(kwargs, message):
  with pytest.raises(ValueError, match=message):
    layers.Mamba2(D, **_SMALL, **kwargs).init_state(1)


def test_a_state_without_the_window_buffer_raises_a_clear_error():
  model, params, apply = _mitigated("window")
  plain_state = layers.Mamba2(D, **_SMALL).init_state(2)
  with pytest.raises(ValueError, match=r"state has 2 parts; expected \(conv_state, ssm_state, "
                                       r"Mamba2Window\) for state_window=3"):
    model.apply(params, jnp.zeros((2, 1, D)), plain_state)
