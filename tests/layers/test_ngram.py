"""NGramHead: its definition, seq_icl's construction, the mixer protocol, numerics.

Inputs are token-like, ``x = E[tokens]`` over a vocabulary of 3, so that 1-,
2- and 3-gram matches exist; on Gaussian inputs no two vectors are equal and
the head reads nothing.

Tolerances: float32 layers against float64 numpy references, and pieces
against one call, agree to 1e-5 of the largest magnitude; bfloat16 compute to
2e-2 of float32 (8 bits of mantissa); gradients in float64 to 1e-7 of
central differences with step 1e-6 (truncation error ~ε², rounding ~1e-16/ε).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm.layers import ngram
from recurrent_lm.layers.ngram import NGramHead
from tests.layers._util import assert_close, assert_trees_close, params_of, perturb, to_numpy

D = 16
BATCH = 2
TIME = 24
VOCAB = 3
RTOL = 1e-5
BF16_RTOL = 2e-2
ORDERS = (1, 2, 3)
_EMBED = np.random.default_rng(123).standard_normal((VOCAB, D)).astype(np.float32)
# Row 0 packs documents of lengths 8, 1, 7, 8; row 1 of lengths 8, 8, 8.
_LENGTHS = [[8, 1, 7, 8], [8, 8, 8]]
_SEGMENTS = np.asarray([np.repeat([3, 4, 9, 2], _LENGTHS[0]), np.repeat([0, 1, 2], _LENGTHS[1])],
                       np.int32)


def _tokens(time, seed=0, batch=BATCH):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, time))


def _inputs(tokens, dtype=jnp.float32):
  return jnp.asarray(_EMBED[tokens], dtype)


def _matches(x, segment_ids, n):
  """``[B, T, T]`` bool M^n of the module docstring, by a loop over its definition."""
  batch, time, _ = x.shape
  seg = np.zeros((batch, time), int) if segment_ids is None else np.asarray(segment_ids)
  mask = np.zeros((batch, time, time), bool)
  for b in range(batch):
    for i in range(time):
      for p in range(i):
        mask[b, i, p] = seg[b, p] == seg[b, i] and all(
            i - k >= 0 and p - 1 - k >= 0
            and seg[b, i - k] == seg[b, i] and seg[b, p - 1 - k] == seg[b, i]
            and np.array_equal(x[b, i - k], x[b, p - 1 - k]) for k in range(n))
  return mask


def _average(mask, x):
  count = mask.sum(-1, keepdims=True)
  return np.where(count > 0, mask @ x / np.maximum(count, 1), 0.0)


def _reference(x, segment_ids, params, orders):
  """The module docstring's y, float64."""
  x = np.asarray(x, np.float64)
  p = to_numpy(params)
  h = np.stack([_average(_matches(x, segment_ids, n), x) for n in orders], axis=2)
  return (np.einsum("btkd,kde->bte", h, p["ngram_proj"]["kernel"]) + p["ngram_proj"]["bias"]
          + x @ p["input_proj"]["kernel"] + p["input_proj"]["bias"])


def _seq_icl_average(tokens, x, n):
  """seq_icl's ``induction_head(input_ids, x, shift_step=1, ngram=n)`` in numpy:
  token matches strictly below the diagonal, shifted down the diagonal n − 1
  times and all required, then moved one key to the right (the token that
  followed), strictly causal again, rows normalised, 0/0 → 0."""
  time = tokens.shape[1]
  strict = np.tril(np.ones((time, time), bool), -1)
  match = (tokens[:, :, None] == tokens[:, None, :]) & strict
  shifted = [match]
  for _ in range(1, n):
    match = np.pad(match, ((0, 0), (1, 0), (1, 0)))[:, :-1, :-1]
    shifted.append(match)
  ih = np.sum(shifted, axis=0) >= n
  ih = np.pad(ih, ((0, 0), (0, 0), (1, 0)))[:, :, :-1] & strict
  return _average(ih, np.asarray(x, np.float64))


@functools.lru_cache(maxsize=None)
def _setup(orders=ORDERS, max_len=48):
  """``(model, params, jitted apply)``, shared by the tests so that equal
  shapes compile once; everything here is deterministic."""
  model = NGramHead(D, orders=orders, max_len=max_len)
  params = perturb(params_of(model, _inputs(_tokens(5))), scale=0.5)
  return model, params, jax.jit(model.apply)


@pytest.mark.parametrize("orders", [2, ORDERS], ids=str)
def test_matches_a_float64_loop_over_the_definition_with_packed_documents(orders):
  model, params, apply = _setup(orders)
  x = _inputs(_tokens(TIME))
  for segment_ids in (None, _SEGMENTS):
    y, _ = apply(params, x, None, None if segment_ids is None else jnp.asarray(segment_ids))
    assert_close(y, _reference(x, segment_ids, params, model._orders()), RTOL,
                 f"y, segment_ids={segment_ids is not None}")


@pytest.mark.parametrize("n", [1, 2, 3])
def test_average_equals_seq_icl_induction_head_on_token_ids(n):
  tokens = _tokens(TIME, seed=1)
  x = _inputs(tokens)
  positions = jnp.broadcast_to(jnp.arange(TIME, dtype=jnp.int32), (BATCH, TIME))
  h = ngram.ngram_average(x, ngram.token_hashes(x), positions,
                          jnp.zeros((BATCH, TIME), jnp.int32), None, (n,), jnp.float32)
  expected = _seq_icl_average(tokens, x, n)
  assert np.any(expected != 0), "no match in the test sequence"
  assert_close(h[:, :, 0], expected, RTOL, f"h^{n}")


@pytest.mark.parametrize("n", [1, 3])
def test_token_ids_match_at_any_depth_where_hidden_states_never_repeat(n):
  """Given ids, the head matches on them (as the reference at every depth), not on ``x``."""
  model, params, apply = _setup(n)
  tokens = _tokens(TIME, seed=2)
  hidden = jax.random.normal(jax.random.key(3), (BATCH, TIME, D), jnp.float32)
  y, _ = apply(params, hidden, None, None, jnp.asarray(tokens))
  h = _seq_icl_average(tokens, hidden, n)
  assert np.any(h != 0), "no match in the test sequence"
  p = to_numpy(params)
  expected = (np.einsum("btd,de->bte", h, p["ngram_proj"]["kernel"][0]) + p["ngram_proj"]["bias"]
              + hidden @ p["input_proj"]["kernel"] + p["input_proj"]["bias"])
  assert_close(y, expected, RTOL, f"y with token ids, n={n}")
  y_bits, _ = apply(params, hidden)       # without ids: random vectors never match
  assert_close(y_bits, hidden @ p["input_proj"]["kernel"] + p["input_proj"]["bias"]
               + p["ngram_proj"]["bias"], RTOL, "y without ids")


def _pieces(time, rng):
  pieces, start = [], 0
  while start < time:
    length = min(int(rng.choice([1, 5])), time - start)
    pieces.append(slice(start, start + length))
    start += length
  return pieces


def test_pieces_and_tokens_with_carried_state_equal_one_call():
  model, params, apply = _setup()
  x = _inputs(_tokens(TIME))
  segment_ids = jnp.asarray(_SEGMENTS)
  y_full, state_full = apply(params, x, None, segment_ids)
  for what, pieces in (("pieces", _pieces(TIME, np.random.default_rng(0))),
                       ("token-by-token", [slice(t, t + 1) for t in range(TIME)])):
    state, ys = model.init_state(BATCH), []
    for piece in pieces:
      y, state = apply(params, x[:, piece], state, segment_ids[:, piece])
      ys.append(y)
    assert_close(jnp.concatenate(ys, 1), y_full, RTOL, f"{what} y")
    assert_trees_close(state, state_full, RTOL, f"{what} state")


def test_packed_row_equals_documents_run_separately():
  model, params, apply = _setup()
  x = _inputs(_tokens(TIME, seed=2))
  x_next = _inputs(_tokens(1, seed=3, batch=1))
  y_packed, state_packed = apply(params, x, None, jnp.asarray(_SEGMENTS))
  for row in range(BATCH):
    start = 0
    for length in _LENGTHS[row]:
      y_doc, state_doc = apply(params, x[row:row + 1, start:start + length])
      assert_close(y_packed[row:row + 1, start:start + length], y_doc, RTOL,
                   f"row {row} document at {start}")
      start += length
    row_state = jax.tree_util.tree_map(lambda s: s[row:row + 1] if s.ndim else s, state_packed)
    y_cont, _ = apply(params, x_next, row_state, jnp.asarray(_SEGMENTS[row:row + 1, -1:]))
    y_cont_doc, _ = apply(params, x_next, state_doc)
    assert_close(y_cont, y_cont_doc, RTOL, f"row {row} continuation")


def test_state_is_init_state_of_an_unbound_module_and_every_param_gets_a_gradient():
  model, params, apply = _setup()
  x = _inputs(_tokens(TIME))
  y, state = apply(params, x)
  expected = NGramHead(D, orders=ORDERS, max_len=48).init_state(BATCH)   # no parameters
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(expected)
  for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
  y_init, state_init = apply(params, x, model.init_state(BATCH))
  assert_close(y_init, y, RTOL, "y from init_state")
  assert_trees_close(state_init, state, RTOL, "state from init_state")

  cotangent = jax.random.normal(jax.random.key(7), x.shape)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x)[0] * cotangent)))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grad)[0]:
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, (
        f"{jax.tree_util.keystr(path)}: zero or non-finite gradient")


def test_gradients_match_central_differences_in_float64():
  with jax.enable_x64(True):
    model = NGramHead(D, orders=(1, 2), max_len=16, dtype=jnp.float64, param_dtype=jnp.float64)
    tokens = _tokens(12, seed=4, batch=1)
    x = _inputs(tokens, jnp.float64)
    params = perturb(params_of(model, x), scale=0.5)
    cotangent = np.random.default_rng(5).standard_normal(x.shape)
    loss = jax.jit(lambda p, x: jnp.sum(jnp.tanh(model.apply(p, x)[0]) * cotangent))
    grad = jax.grad(loss)(params, x)
    rng, eps = np.random.default_rng(6), 1e-6
    for _ in range(3):
      direction = jax.tree_util.tree_map(lambda p: rng.standard_normal(p.shape), params)
      step = lambda s: jax.tree_util.tree_map(lambda p, v: p + s * eps * v, params, direction)
      numeric = (loss(step(1), x) - loss(step(-1), x)) / (2 * eps)
      analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(
          jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(direction)))
      assert abs(numeric - analytic) <= 1e-7 * max(abs(analytic), 1.0), (numeric, analytic)

    # Gradient in x: the match pattern is held fixed (it is piecewise constant in
    # x), so the loss linear in y has dL/dx_p = W1 c_p + Σ_n Σ_i M^n_ip/|M^n_i| W0^n c_i.
    grad_x = jax.grad(lambda x: jnp.sum(model.apply(params, x)[0] * cotangent))(x)
    p = to_numpy(params)
    expected = cotangent @ p["input_proj"]["kernel"].T
    for k, n in enumerate((1, 2)):
      mask = _matches(np.asarray(x), None, n).astype(float)
      weights = mask / np.maximum(mask.sum(-1, keepdims=True), 1)
      expected += np.swapaxes(weights, 1, 2) @ (cotangent @ p["ngram_proj"]["kernel"][k].T)
    assert_close(grad_x, expected, 1e-10, "dL/dx")


def test_bfloat16_compute_stays_close_to_float32():
  model, params, apply = _setup()
  x = _inputs(_tokens(TIME))
  y, state = apply(params, x, None, jnp.asarray(_SEGMENTS))
  y_bf16, state_bf16 = jax.jit(NGramHead(D, orders=ORDERS, max_len=48,
                                         dtype=jnp.bfloat16).apply)(
      params, x.astype(jnp.bfloat16), None, jnp.asarray(_SEGMENTS))
  assert y_bf16.dtype == jnp.bfloat16 and state_bf16.values.dtype == jnp.bfloat16
  assert_close(y_bf16.astype(jnp.float32), y, BF16_RTOL, "y")
  assert_close(state_bf16.values.astype(jnp.float32), state.values, BF16_RTOL, "values")


def test_decoding_to_capacity_stays_finite_and_one_more_token_is_nan():
  capacity = 40
  model, params, _ = _setup(max_len=capacity)
  x = _inputs(_tokens(capacity + 1, seed=7, batch=1))

  @jax.jit
  def decode(params, x):
    def step(state, x_t):
      y, state = model.apply(params, x_t[None, None], state)
      return state, y[0, 0]
    return jax.lax.scan(step, model.init_state(1), x[0])

  state, ys = decode(params, x)
  assert bool(jnp.all(jnp.isfinite(ys[:capacity]))), "non-finite output within capacity"
  assert bool(jnp.all(jnp.isnan(ys[capacity]))), "a token past capacity is not NaN"
  y_full, _ = jax.jit(model.apply)(params, x[:, :capacity])
  assert_close(ys[None, :capacity], y_full, RTOL, "decoded y")
  assert int(state.index) == capacity + 1


def test_equality_is_bitwise_and_hashes_are_distinct():
  a, b = _EMBED[0], _EMBED[1]
  a_ulp = a.copy()
  a_ulp[3] = np.nextafter(a[3], np.float32(np.inf))
  x = jnp.asarray(np.stack([a, b, a, b, a_ulp, b])[None])
  positions = jnp.arange(6, dtype=jnp.int32)[None]
  h = ngram.ngram_average(x, ngram.token_hashes(x), positions, jnp.zeros((1, 6), jnp.int32),
                          None, (1,), jnp.float32)
  # Position 2 (a) reads what followed a at 0; 3 (b) what followed b at 1;
  # 4 (a one ulp off) matches nothing; 5 (b) matches 1 (read 2) and 3 (read 4).
  expected = np.stack([0 * a, 0 * a, b, a, 0 * a, (a + a_ulp) / 2])[None, :, None]
  assert_close(h, expected, 1e-7, "h")
  vectors = np.random.default_rng(8).standard_normal((4096, D)).astype(np.float32)
  nudged = vectors.copy()
  nudged[:, 0] = np.nextafter(nudged[:, 0], np.float32(np.inf))
  hashes = np.asarray(ngram.token_hashes(jnp.asarray(np.concatenate([vectors, nudged]))))
  assert len({tuple(row) for row in hashes}) == 2 * len(vectors), "hash collision"


def test_params_carry_logical_axis_names():
  boxed = jax.eval_shape(NGramHead(D, orders=ORDERS).init, jax.random.key(0),
                         jnp.zeros((1, 3, D)))["params"]
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert len(leaves) == 4
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), f"unnamed parameter {leaf.shape}"
    assert len(leaf.names) == leaf.value.ndim
  assert boxed["ngram_proj"]["kernel"].value.shape == (len(ORDERS), D, D)


@pytest.mark.parametrize("orders", [0, (), (1, 1), (2, "3"), True])
def test_bad_orders_raise_a_clear_error(orders):
  with pytest.raises(ValueError, match=r"orders=.*expected a positive int or a non-empty"):
    NGramHead(D, orders=orders).init_state(1)


def test_bad_inputs_and_states_raise_clear_errors():
  model = NGramHead(D, max_len=8)
  x = jnp.zeros((2, 5, D))
  with pytest.raises(ValueError, match=r"x has shape \[2, 5, 15\]; expected \[B, T, 16\]"):
    model.init(jax.random.key(0), x[..., :-1])
  params = params_of(model, x)
  with pytest.raises(TypeError, match="state is a tuple; expected an NGramCache"):
    model.apply(params, x, (1, 2))
  with pytest.raises(ValueError, match=r"state.values has shape \[1, 8, 16\]; expected \[2, 8, 16\]"):
    model.apply(params, x, model.init_state(1))
