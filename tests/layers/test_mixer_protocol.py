"""The mixer protocol, checked on every token mixer by one template.

``y, state = mixer(x, state=None, segment_ids=None)``: one call on a sequence
equals the same sequence in pieces with the state carried, equals token by
token; a packed row equals its documents run one by one; the state has the
fixed structure of ``init_state``, which needs no parameters.

Numerics: bfloat16 compute with the same float32 parameters stays within
2e-2 of float32, and 100k tokens decoded one at a time keep every output and
the state finite.

Tolerances: float32 otherwise; outputs and states agree to 1e-4 of their
largest magnitude (chunked vs token-by-token summation orders differ).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import layers
from recurrent_lm.models import registry
from tests.layers._util import assert_close, assert_trees_close, params_of, perturb

D = 32
BATCH = 2
RTOL = 1e-4
# bfloat16 keeps 8 bits of mantissa (ε = 2^-8 ≈ 4e-3); every mixer measured
# within 1e-2 of float32 on these inputs, outputs and states.
BF16_RTOL = 2e-2
DECODE_STEPS = 100_000
TIME = 21
# JRT's prefix is read non-causally, so a call that continues the prefix
# reads it differently from one call; its pieces start after one prefill of it.
PREFIX = 4
_PREFILL = {"jrt": PREFIX}

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
    ("liger_gla", lambda **kw: layers.LigerGLA(D, num_heads=4, num_kv_heads=2, chunk_size=8,
                                               **kw)),
    ("liger_attention", lambda **kw: layers.LigerAttention(
        D, num_heads=4, num_kv_heads=2, window=6, rope_theta=10_000.0, chunk_size=8, **kw)),
    ("h3", lambda **kw: layers.H3(D, num_heads=4, d_state=8, chunk_size=8, **kw)),
    ("jrt", lambda **kw: layers.PrefixLinearAttention(
        D, num_heads=2, prefix_len=PREFIX, feature_dim=4, chunk_size=8, **kw)),
    # Chunk 4 against pieces of 5: pieces start and end inside memory chunks.
    # Yaad, Memora and the linear memory are the same layer with another
    # objective, retention or memory: tests/ops/test_neural_memory.py checks
    # them against its reference on packed rows and in pieces.
    ("titans", lambda **kw: layers.NeuralMemory(D, num_heads=2, expansion=2, chunk_size=4,
                                                **kw)),
    ("moneta", lambda **kw: registry.get_mixer("moneta")(D, num_heads=2, expansion=2,
                                                         chunk_size=4, **kw)),
    ("titans_mag", lambda **kw: layers.TitansMAG(D, num_heads=2, window=6, expansion=2,
                                                 chunk_size=4, **kw)),
    ("titans_mac", lambda **kw: layers.TitansMAC(D, num_heads=2, chunk_size=4, **kw)),
    # Random inputs never repeat, so only its W1 x path is exercised here;
    # tests/layers/test_ngram.py checks the matching.
    ("ngram", lambda **kw: layers.NGramHead(D, orders=(1, 2), max_len=48, **kw)),
]
NAMES = [name for name, _ in CASES]
# Their pieces / packing invariants are checked by their own files at larger
# memory steps (here the memory barely moves): the op's reference on packed
# rows and pieces for Moneta's ℓq path, test_titans_mac for MAC.
_INVARIANTS_ELSEWHERE = ("moneta", "titans_mac")
# Checked here only for 100k decoded tokens (the Miras memories all must stay finite).
DECODE_ONLY = [
    ("yaad", lambda **kw: registry.get_mixer("yaad")(D, num_heads=2, expansion=2, chunk_size=4,
                                                     **kw)),
    ("memora", lambda **kw: registry.get_mixer("memora")(D, num_heads=2, expansion=2,
                                                         chunk_size=4, **kw)),
]
_MAKERS = dict(CASES + DECODE_ONLY)


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


def _pieces(time, rng, start=0):
  """Consecutive pieces of ``range(time)``: ``range(start)`` whole, then random
  pieces of lengths 1 or 5.

  Two lengths keep the number of compilations small; 5 is prime to the chunk
  size 8, so pieces start and end inside chunks.
  """
  pieces = [] if start == 0 else [slice(0, start)]
  while start < time:
    length = min(int(rng.choice([1, 5])), time - start)
    pieces.append(slice(start, start + length))
    start += length
  return pieces


def _assert_same_structure(state, expected):
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(expected)
  for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(expected)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in _INVARIANTS_ELSEWHERE])
def test_pieces_and_tokens_with_carried_state_equal_one_call(name):
  model, params, apply = _setup(name)
  x = _inputs(TIME)
  y_full, state_full = apply(params, x)

  prefill = _PREFILL.get(name, 0)
  state, ys = model.init_state(BATCH), []
  for piece in _pieces(TIME, np.random.default_rng(0), prefill):
    y, state = apply(params, x[:, piece], state)
    ys.append(y)
  assert_close(jnp.concatenate(ys, 1), y_full, RTOL, "pieces y")
  assert_trees_close(state, state_full, RTOL, "pieces state")

  state, ys = model.init_state(BATCH), []
  if prefill:
    y, state = apply(params, x[:, :prefill], state)
    ys.append(y)
  for t in range(prefill, TIME):
    y, state = apply(params, x[:, t:t + 1], state)
    ys.append(y)
  assert_close(jnp.concatenate(ys, 1), y_full, RTOL, "token-by-token y")
  assert_trees_close(state, state_full, RTOL, "token-by-token state")


@pytest.mark.parametrize("name", [n for n in NAMES if n not in _INVARIANTS_ELSEWHERE])
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
def test_bfloat16_compute_stays_close_to_float32(name):
  model, params, apply = _setup(name)
  x = _inputs(TIME)
  y, state = apply(params, x)
  y_bf16, state_bf16 = jax.jit(_MAKERS[name](dtype=jnp.bfloat16).apply)(
      params, x.astype(jnp.bfloat16))
  assert_close(y_bf16.astype(jnp.float32), y, BF16_RTOL, "y")
  # Floating leaves only: integer leaves are bookkeeping (positions, and the
  # n-gram head's hashes of its inputs' bits, which depend on the dtype).
  floats = lambda tree: [leaf.astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(tree)
                         if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert_trees_close(floats(state_bf16), floats(state), BF16_RTOL)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("attention", "ngram")]
                         + [name for name, _ in DECODE_ONLY])
def test_decoding_100k_tokens_keeps_the_state_and_outputs_finite(name):
  """Full attention and the n-gram head are left out: their caches hold
  ``max_len`` tokens by design (test_ngram checks NaN past the capacity)."""
  model, params, _ = _setup(name)
  x = 3.0 * jax.random.normal(jax.random.key(3), (DECODE_STEPS, 1, 1, D))

  @jax.jit
  def decode(params, x):
    def step(state, x_t):
      y, state = model.apply(params, x_t, state)
      return state, jnp.all(jnp.isfinite(y))
    return jax.lax.scan(step, model.init_state(1), x)

  state, finite = decode(perturb(params, scale=0.5), x)
  assert bool(jnp.all(finite)), f"non-finite output at step {int(jnp.argmin(finite))}"
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    assert bool(jnp.all(jnp.isfinite(leaf))), f"state{jax.tree_util.keystr(path)} is not finite"


@pytest.mark.parametrize("name", [n for n in NAMES if n != "ngram"])
def test_gradient_is_finite_and_nonzero_for_every_param(name):
  """The n-gram head is left out: its W0 sees no match in random inputs
  (test_ngram checks its gradients on token sequences)."""
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
