"""H3 against a float64 loop over its equations; its two forms agree; long decoding is stable.

Tolerances (relative to the largest magnitude, float32 unless stated):
1e-5 against the float64 reference and between the forms (outputs, states,
gradients); 3e-2 for bfloat16 compute against float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm.layers.h3 import H3
from tests.layers._util import assert_close, assert_trees_close, params_of, to_numpy

D, N, WIDTH = 16, 8, 4          # model width, state size (4 complex modes), shift taps
BATCH, TIME, CHUNK = 2, 11, 4   # 11 = 2 full chunks + 3: pieces end inside chunks
RTOL = 1e-5


def _model(heads, impl="chunked", **kw):
  return H3(D, num_heads=heads, d_state=N, shift_size=WIDTH, chunk_size=CHUNK, impl=impl, **kw)


def _random_state(model, seed):
  window, ssm = model.init_state(BATCH)
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, window.shape), jax.random.normal(k2, ssm.shape)


@functools.lru_cache(maxsize=None)
def _init(heads):
  x = jnp.zeros((1, 1, D))     # parameters do not depend on the length: compile little
  return params_of(_model(heads, "recurrent"), x)


@functools.lru_cache(maxsize=None)
def _setup(heads):
  """Perturbed parameters (so that D, D_k, A's real part are all generic)."""
  return _perturb(_init(heads), scale=0.3)


def _perturb(params, seed=1, scale=0.1):
  """``_util.perturb`` with numpy's generator: N(0, scale²) noise on every
  parameter, without compiling a jax.random call per parameter shape."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


@functools.lru_cache(maxsize=None)
def _apply(heads, impl, dtype=jnp.float32):
  """One jitted apply per configuration, shared by the tests (fewer compilations)."""
  return jax.jit(_model(heads, impl, dtype=dtype).apply)


def _inputs_of_the_diagonal_ssm(p, x, window):
  """``(q, k̄, v, shift history)`` of the module docstring, float64."""
  b, t, _ = x.shape
  proj = lambda name, a: np.einsum("btd,dhp->bthp", a, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("q_proj", x), proj("k_proj", x), proj("v_proj", x)
  taps = p["shift_weight"].shape[0]
  weight = p["shift_weight"].reshape(taps, -1)
  history = np.concatenate([window, k.reshape(b, t, -1)], axis=1)
  conv = sum(history[:, i:i + t] * weight[i] for i in range(taps))
  return q, conv.reshape(k.shape) + p["shift_D"] * k, v, history


def _discretised(p):
  """``(Ā, B̄, C)`` ``[H, M]`` complex128: S4D-Lin, bilinear."""
  dt = np.exp(p["log_dt"])[:, None]
  dt_a = dt * (-np.exp(p["A_log"]) + 1j * p["A_imag"])
  return ((1 + dt_a / 2) / (1 - dt_a / 2), dt / (1 - dt_a / 2),
          p["C"][..., 0] + 1j * p["C"][..., 1])


@functools.lru_cache(maxsize=None)
def _vjp(heads, impl):
  """``(y, state)`` and the pullback of ``cotangent`` to (params, x, state)."""
  def run(params, x, state, cotangent):
    out, pullback = jax.vjp(_model(heads, impl).apply, params, x, state)
    return out, pullback(cotangent)
  return jax.jit(run)


def _reference(p, x, window, ssm):
  """The module docstring's equations, token by token, in float64."""
  q, k_bar, v, history = _inputs_of_the_diagonal_ssm(p, x, window)
  a_bar, b_bar, c = _discretised(p)
  state = ssm[..., 0] + 1j * ssm[..., 1]                                # [B, H, P, P, M]
  ys = []
  for s in range(x.shape[1]):
    kv = np.einsum("bhi,bhj->bhij", k_bar[:, s], v[:, s])
    state = a_bar[:, None, None] * state + b_bar[:, None, None] * kv[..., None]
    out = 2 * np.einsum("hm,bhijm->bhij", c, state).real + p["D"][:, None, None] * kv
    o = np.einsum("bhi,bhij->bhj", q[:, s], out)
    ys.append(np.einsum("bhp,hpd->bd", o, p["o_proj"]["kernel"]) + p["o_proj"]["bias"])
  taps = p["shift_weight"].shape[0]
  return (np.stack(ys, 1), history[:, -(taps - 1):],
          np.stack([state.real, state.imag], -1))


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
@pytest.mark.parametrize("heads", [None, 2])   # width-1 heads (H3's default); 8×8 outer products
def test_matches_a_float64_loop_over_the_equations_from_a_given_state(heads, impl):
  params = _setup(heads)
  x = jax.random.normal(jax.random.key(1), (BATCH, TIME, D))
  state = _random_state(_model(heads), seed=2)
  y, (window, ssm) = _apply(heads, impl)(params, x, state)
  y_ref, window_ref, ssm_ref = _reference(
      to_numpy(params), np.asarray(x, np.float64), *(np.asarray(s, np.float64) for s in state))
  assert_close(y, y_ref, RTOL, "y")
  assert_close(window, window_ref, RTOL, "window")
  assert_close(ssm, ssm_ref, RTOL, "X")


@pytest.mark.parametrize("fresh", [True, False])
def test_chunked_and_recurrent_forms_agree_with_gradients(fresh, heads=2):
  """Outputs, final states and the gradients of a random projection of both
  with respect to every parameter, the input and the initial state."""
  params = _setup(heads)
  x = jax.random.normal(jax.random.key(3), (BATCH, TIME, D))
  state = _model(heads).init_state(BATCH) if fresh else _random_state(_model(heads), seed=4)
  keys = jax.random.split(jax.random.key(5), 3)
  cotangent = (jax.random.normal(keys[0], x.shape),
               tuple(jax.random.normal(key, s.shape) for key, s in zip(keys[1:], state)))
  run = lambda impl: _vjp(heads, impl)(params, x, state, cotangent)
  (y_c, state_c), grads_c = run("chunked")
  (y_r, state_r), grads_r = run("recurrent")
  assert_close(y_c, y_r, RTOL, "y")
  assert_trees_close(state_c, state_r, RTOL, "state")
  for what, g_c, g_r in zip(("params", "x", "state"), grads_c, grads_r):
    assert_trees_close(g_c, g_r, RTOL, f"d/d{what}")


def test_chunked_form_reads_a_nonzero_initial_state(heads=2):
  """A call that starts from the state of a first call equals one call, and
  the initial state's term ``C Ā^{t+1} X_0`` is what it adds: zeroing the
  diagonal-SSM state changes the output."""
  model, params, apply = _model(heads), _setup(heads), _apply(heads, "chunked")
  x = jax.random.normal(jax.random.key(6), (BATCH, 2 * TIME, D))
  y_full, state_full = apply(params, x, model.init_state(BATCH))
  y_head, state_head = apply(params, x[:, :TIME], model.init_state(BATCH))
  y_tail, state_tail = apply(params, x[:, TIME:], state_head)
  assert_close(jnp.concatenate([y_head, y_tail], 1), y_full, RTOL, "y")
  assert_trees_close(state_tail, state_full, RTOL)
  y_cut, _ = apply(params, x[:, TIME:], (state_head[0], jnp.zeros_like(state_head[1])))
  assert float(jnp.max(jnp.abs(y_cut - y_tail))) > 1e-3 * float(jnp.max(jnp.abs(y_tail)))


@pytest.mark.parametrize("impl", ["chunked", "recurrent"])
def test_segment_ids_restart_both_ssms(impl):
  """Row 0 packs documents of lengths 3, 1, 5, 2 (starting inside and at the
  edges of chunks); each equals its own call, the first continuing the given
  state; the final state continues the last document."""
  model, params, apply = _model(2), _setup(2), _apply(2, impl)
  alone = _apply(2, "recurrent")     # documents alone: forms agree (tested above)
  lengths = [3, 1, 5, 2]
  segment_ids = jnp.asarray([np.repeat([7, 8, 9, 4], lengths), np.full(TIME, 1)], jnp.int32)
  x = jax.random.normal(jax.random.key(7), (BATCH, TIME, D))
  state = _random_state(model, seed=8)
  y, final = apply(params, x, state, segment_ids=segment_ids)

  y_row1, final_row1 = alone(params, x[1:], jax.tree.map(lambda s: s[1:], state))
  assert_close(y[1:], y_row1, RTOL, "unpacked row")
  start = 0
  for i, length in enumerate(lengths):
    doc_state = jax.tree.map(lambda s: s[:1], state if i == 0 else model.init_state(BATCH))
    y_doc, final_doc = alone(params, x[:1, start:start + length], doc_state)
    assert_close(y[:1, start:start + length], y_doc, RTOL, f"document {i}")
    start += length
  assert_trees_close(jax.tree.map(lambda s: s[:1], final), final_doc, RTOL, "final state")
  assert_trees_close(jax.tree.map(lambda s: s[1:], final), final_row1, RTOL, "row 1 state")


def test_decoding_100k_tokens_keeps_the_state_finite_and_bounded():
  """Token-by-token decoding (T = 1 calls, the recurrent form) of 100k tokens
  with large inputs stays finite, and the diagonal state within the bound
  ``max|B̄| · max_t |k̄_t v_tᵀ| / (1 − max|Ā|)`` that ``|Ā| < 1`` guarantees."""
  model, params = _model(2), _setup(2)
  x = 3.0 * jax.random.normal(jax.random.key(9), (100_000, 1, 1, D))

  @jax.jit
  def decode(params, x):
    def step(state, x_t):
      y, state = model.apply(params, x_t, state)
      return state, (jnp.max(jnp.abs(y)), jnp.max(jnp.abs(state[1])))
    return jax.lax.scan(step, model.init_state(1), x)

  _, (y_max, state_max) = decode(params, x)
  assert np.isfinite(np.asarray(y_max)).all() and np.isfinite(np.asarray(state_max)).all()
  p = to_numpy(params)
  _, k_bar, v, _ = _inputs_of_the_diagonal_ssm(p, np.asarray(x[:, 0, 0], np.float64)[None],
                                               np.zeros((1, WIDTH - 1, D)))
  a_bar, b_bar, _ = _discretised(p)
  kv_max = (np.abs(k_bar).max(-1) * np.abs(v).max(-1)).max()          # max |k̄_i v_j|
  bound = np.abs(b_bar).max() * kv_max / (1 - np.abs(a_bar).max())
  assert 0 < float(state_max.max()) <= bound


def test_bfloat16_compute_is_close_to_float32():
  """bf16 projections (f32 params, f32 SSMs and state) stay within 3e-2 of f32."""
  x = jax.random.normal(jax.random.key(10), (BATCH, TIME, D))
  params = _setup(2)
  state = _model(2).init_state(BATCH)
  y32, (_, ssm32) = _apply(2, "chunked")(params, x, state)
  y16, (window16, ssm16) = _apply(2, "chunked", jnp.bfloat16)(
      params, x.astype(jnp.bfloat16), state)
  assert y16.dtype == jnp.bfloat16
  assert window16.dtype == ssm16.dtype == jnp.float32
  assert_close(y16.astype(jnp.float32), y32, 3e-2, "y")
  assert_close(ssm16, ssm32, 3e-2, "X")


def test_initialisation_follows_the_reference():
  params = _init(None)["params"]                     # D heads of width 1, N/2 = 4 modes
  np.testing.assert_allclose(np.exp(params["A_log"]), np.full((D, N // 2), 0.5), rtol=1e-6)
  np.testing.assert_allclose(params["A_imag"], np.tile(np.pi * np.arange(N // 2), (D, 1)),
                             rtol=1e-6)
  dt = np.exp(np.asarray(params["log_dt"]))
  assert dt.shape == (D,) and dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 0.1 * (1 + 1e-6)
  assert np.abs(params["shift_weight"]).max() <= 1 / np.sqrt(WIDTH)
  assert 0.5 < np.std(params["C"]) * np.sqrt(2) < 1.5                  # complex N(0, 1)
  # Defaults: N = 64, W = N taps, D heads of width 1.
  model = H3(32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3, 32)))["params"]
  assert shapes["shift_weight"].value.shape == (64, 32, 1)
  assert shapes["A_log"].value.shape == shapes["A_imag"].value.shape == (32, 32)
  assert shapes["C"].value.shape == (32, 32, 2)
  window, ssm = model.init_state(2)
  assert window.shape == (2, 63, 32) and ssm.shape == (2, 32, 1, 1, 32, 2)
