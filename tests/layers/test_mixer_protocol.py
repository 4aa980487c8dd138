"""The mixer protocol, checked on every token mixer by one template.

``y, state = mixer(x, state=None, segment_ids=None)``: one call on a sequence
equals the same sequence in pieces with the state carried, equals token by
token; a packed row equals its documents run one by one; the state has the
fixed structure of ``init_state``, which needs no parameters.

Tolerances: float32 throughout; outputs and states agree to 1e-4 of their
largest magnitude (chunked vs token-by-token summation orders differ).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import layers
from tests.layers._util import assert_close, assert_trees_close, params_of

D = 32
BATCH = 2
RTOL = 1e-4
TIME = 21

# (name, constructor of a small mixer); chunk sizes below the test lengths so
# that pieces start and end inside chunks.
CASES = [
    ("attention", lambda **kw: layers.Attention(
        D, num_heads=4, num_kv_heads=2, rope_theta=10_000.0, max_len=48, **kw)),
    ("sliding_window", lambda **kw: layers.Attention(
        D, num_heads=4, window=6, rope_theta=10_000.0, **kw)),
    ("linear_attention", lambda **kw: layers.LinearAttention(
        D, num_heads=2, feature_map="elu_plus_one", chunk_size=8, **kw)),
    ("based", lambda **kw: layers.LinearAttention(
        D, num_heads=2, feature_dim=8, feature_map="taylor", normalize=True, chunk_size=8,
        **kw)),
    ("gla", lambda **kw: layers.GatedLinearAttention(D, num_heads=2, chunk_size=8, **kw)),
    ("base_conv", lambda **kw: layers.BaseConv(D, kernel_size=3, expand=4, **kw)),
    ("mamba", lambda **kw: layers.Mamba(D, d_state=4, **kw)),
    ("slstm", lambda **kw: layers.SLSTM(D, num_heads=4, **kw)),
    ("mlstm", lambda **kw: layers.MLSTM(D, num_heads=2, chunk_size=8, **kw)),
    ("qlstm", lambda **kw: layers.QLSTM(D, num_heads=4, **kw)),
    ("mamba2", lambda **kw: layers.Mamba2(
        D, d_state=8, head_dim=8, n_groups=2, chunk_size=8, **kw)),
]
NAMES = [name for name, _ in CASES]
_MAKERS = dict(CASES)


@functools.lru_cache(maxsize=None)
def _setup(name):
  """``(model, params, jitted apply)`` of a case, shared by the tests of this file.

  Sharing the jitted apply lets tests that call the same shapes reuse one
  compilation; everything here is deterministic, so sharing changes no result.
  """
  model = _MAKERS[name]()
  return model, params_of(model, _inputs(TIME)), jax.jit(model.apply)


def _inputs(time, seed=0, batch=BATCH):
  return jax.random.normal(jax.random.key(seed), (batch, time, D), jnp.float32)


def _pieces(time, rng):
  """Random consecutive pieces of ``range(time)``, of lengths 1 or 5.

  Two lengths keep the number of compilations small; 5 is prime to the chunk
  size 8, so pieces start and end inside chunks.
  """
  pieces, start = [], 0
  while start < time:
    length = min(int(rng.choice([1, 5])), time - start)
    pieces.append(slice(start, start + length))
    start += length
  return pieces


def _assert_same_structure(state, expected):
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(expected)
  for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("name", NAMES)
def test_pieces_and_tokens_with_carried_state_equal_one_call(name):
  model, params, apply = _setup(name)
  x = _inputs(TIME)
  y_full, state_full = apply(params, x)

  state, ys = model.init_state(BATCH), []
  for piece in _pieces(TIME, np.random.default_rng(0)):
    y, state = apply(params, x[:, piece], state)
    ys.append(y)
  assert_close(jnp.concatenate(ys, 1), y_full, RTOL, "pieces y")
  assert_trees_close(state, state_full, RTOL, "pieces state")

  state, ys = model.init_state(BATCH), []
  for t in range(TIME):
    y, state = apply(params, x[:, t:t + 1], state)
    ys.append(y)
  assert_close(jnp.concatenate(ys, 1), y_full, RTOL, "token-by-token y")
  assert_trees_close(state, state_full, RTOL, "token-by-token state")


@pytest.mark.parametrize("name", NAMES)
def test_packed_row_equals_documents_run_separately(name):
  model, params, apply = _setup(name)
  # Row 0 holds documents of lengths 5, 1, 10, 5; row 1 of lengths 10, 1, 10.
  lengths = [[5, 1, 10, 5], [10, 1, 10]]
  ids = [[3, 4, 9, 2], [0, 1, 2]]
  segment_ids = jnp.asarray(
      [np.repeat(row_ids, row_lengths) for row_ids, row_lengths in zip(ids, lengths)],
      jnp.int32)
  x = _inputs(TIME)
  x_next = _inputs(1, seed=1, batch=1)
  y_packed, state_packed = apply(params, x, segment_ids=segment_ids)

  for row in range(BATCH):
    start = 0
    for length in lengths[row]:
      y_doc, state_doc = apply(params, x[row:row + 1, start:start + length])
      assert_close(y_packed[row:row + 1, start:start + length], y_doc, RTOL,
                   f"row {row} document at {start}")
      start += length
    # The state after the packed row continues its last document.
    row_state = jax.tree_util.tree_map(lambda s: s[row:row + 1] if s.ndim else s,
                                       state_packed)
    y_cont, _ = apply(params, x_next, row_state, segment_ids=segment_ids[row:row + 1, -1:])
    y_cont_doc, _ = apply(params, x_next, state_doc)
    assert_close(y_cont, y_cont_doc, RTOL, f"row {row} continuation")


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_state_structure_match_init_state_of_unbound_module(name):
  model, params, apply = _setup(name)
  expected = _MAKERS[name]().init_state(BATCH)  # unbound: no parameters exist
  x = _inputs(TIME)
  y, state = apply(params, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  _assert_same_structure(state, expected)


@pytest.mark.parametrize("name", NAMES)
def test_init_state_is_the_state_of_an_empty_sequence(name):
  model, params, apply = _setup(name)
  x = _inputs(TIME)
  y_none, state_none = apply(params, x)
  y_init, state_init = apply(params, x, model.init_state(BATCH))
  assert_close(y_init, y_none, RTOL, "y")
  assert_trees_close(state_init, state_none, RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_compute_keeps_float32_params_and_a_fixed_state(name):
  model = _MAKERS[name](dtype=jnp.bfloat16)
  x = _inputs(5).astype(jnp.bfloat16)
  params = params_of(model, x)
  y, state = jax.jit(model.apply)(params, x)
  assert y.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  _assert_same_structure(state, model.init_state(BATCH))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_is_finite_and_nonzero_for_every_param(name):
  model, params, _ = _setup(name)
  x = _inputs(TIME)
  cotangent = jax.random.normal(jax.random.key(7), x.shape)

  @jax.jit
  def grad(p):
    return jax.grad(lambda p: jnp.sum(model.apply(p, x)[0] * cotangent))(p)

  for path, g in jax.tree_util.tree_flatten_with_path(grad(params))[0]:
    param = jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(g))), f"{param}: non-finite gradient"
    assert float(jnp.max(jnp.abs(g))) > 0, f"{param}: zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_params_carry_logical_axis_names(name):
  model = _MAKERS[name]()
  boxed = jax.eval_shape(model.init, jax.random.key(0), _inputs(3))["params"]
  leaves = jax.tree_util.tree_leaves(
      boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), f"unnamed parameter {leaf.shape}"
    assert len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize("name", NAMES)
def test_wrong_model_width_raises_a_clear_error(name):
  model = _MAKERS[name]()
  x = jax.random.normal(jax.random.key(0), (BATCH, 5, D - 1))
  with pytest.raises(ValueError, match=r"x has shape \[2, 5, 31\]; expected \[B, T, 32\]"):
    model.init(jax.random.key(0), x)
