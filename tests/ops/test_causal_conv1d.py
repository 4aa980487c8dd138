"""causal_conv1d: a per-channel np.convolve reference, state passing, packing,
gradients and argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from recurrent_lm import ops

# Counter-based "rbg" keys: threefry's compile time would dominate these small tests.
_key = functools.partial(jax.random.key, impl="rbg")

# float32 sums of at most W products against a float64 reference.
ATOL = 1e-5
GRAD_ATOL = 1e-5

_conv = jax.jit(ops.causal_conv1d)


def _inputs(seed, batch=2, time=11, dim=5, width=4):
  kx, kw, kb, ks = jax.random.split(_key(seed), 4)
  x = jax.random.normal(kx, (batch, time, dim))
  weight = jax.random.normal(kw, (width, dim))
  bias = jax.random.normal(kb, (dim,))
  state = jax.random.normal(ks, (batch, width - 1, dim))
  return x, weight, bias, state


def _reference(x, weight, bias=None, state=None):
  """Per row and channel: ``np.convolve`` of ``concat(state, x)`` with the flipped taps."""
  x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
  batch, time, dim = x.shape
  width = weight.shape[0]
  state = np.zeros((batch, width - 1, dim)) if state is None else np.asarray(state, np.float64)
  xs = np.concatenate([state, x], axis=1)
  y = np.empty((batch, time, dim))
  for b in range(batch):
    for d in range(dim):
      y[b, :, d] = np.convolve(xs[b, :, d], weight[::-1, d], mode="valid")
  if bias is not None:
    y += np.asarray(bias, np.float64)
  return y


def _toeplitz_conv(x, weight, bias, state):
  """The same convolution as one banded matmul, differentiable, for gradients."""
  width, time = weight.shape[0], x.shape[1]
  xs = jnp.concatenate([state, x], axis=1)
  offset = jnp.arange(time + width - 1)[None, :] - jnp.arange(time)[:, None]  # [T, T+W−1]
  band = jnp.where(((offset >= 0) & (offset < width))[..., None],
                   weight[jnp.clip(offset, 0, width - 1)], 0)
  return jnp.einsum("bsd,tsd->btd", xs, band) + bias


def _run_in_pieces(x, weight, pieces, state=None, segment_ids=None, bias=None):
  outs, start = [], 0
  for length in pieces:
    piece = slice(start, start + length)
    seg = None if segment_ids is None else segment_ids[:, piece]
    y, state = _conv(x[:, piece], weight, bias=bias, state=state, segment_ids=seg)
    outs.append(y)
    start += length
  return jnp.concatenate(outs, axis=1), state


def test_matches_convolution_reference_with_state_and_bias():
  x, weight, bias, state = _inputs(0)
  y, _ = _conv(x, weight, bias=bias, state=state)
  np.testing.assert_allclose(y, _reference(x, weight, bias, state), atol=ATOL)


def test_missing_state_reads_zeros_before_the_start():
  x, weight, _, _ = _inputs(1)
  y, _ = _conv(x, weight)
  np.testing.assert_allclose(y, _reference(x, weight), atol=ATOL)


def test_returned_state_is_the_last_inputs_oldest_first():
  x, weight, _, state = _inputs(2, time=2, width=4)
  _, new_state = _conv(x, weight, state=state)
  # Only two new inputs: the newest state entry survives in front of them.
  np.testing.assert_array_equal(new_state, jnp.concatenate([state[:, 2:], x], axis=1))


def test_width_one_is_a_pointwise_scale_with_empty_state():
  x, weight, bias, _ = _inputs(3, width=1)
  y, state = _conv(x, weight, bias=bias)
  assert state.shape == (2, 0, 5)
  np.testing.assert_allclose(y, x * weight[0] + bias, atol=ATOL)


def test_pieces_and_token_by_token_equal_whole_sequence():
  x, weight, bias, state = _inputs(4)
  whole, last = _conv(x, weight, bias=bias, state=state)
  for pieces in ([2, 1, 6, 2], [1] * 11):
    out, carried = _run_in_pieces(x, weight, pieces, state=state, bias=bias)
    np.testing.assert_allclose(out, whole, atol=ATOL)
    np.testing.assert_array_equal(carried, last)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _whole_and_two_pieces(pool, batch, time, width, dim, cut):
  """Slices of one random pool, one compiled program per drawn shape."""
  x, weight, bias, state = pool
  x, weight, bias = x[:batch, :time, :dim], weight[:width, :dim], bias[:dim]
  state = state[:batch, :width - 1, :dim]
  whole, last = ops.causal_conv1d(x, weight, bias=bias, state=state)
  first, mid = ops.causal_conv1d(x[:, :cut], weight, bias=bias, state=state)
  second, carried = ops.causal_conv1d(x[:, cut:], weight, bias=bias, state=mid)
  return whole, last, jnp.concatenate([first, second], axis=1), carried


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), time=st.integers(1, 9), width=st.integers(1, 4),
       dim=st.integers(1, 3), data=st.data())
def test_state_passing_holds_for_any_shape(batch, time, width, dim, data):
  cut = data.draw(st.integers(0, time), label="cut")
  pool = _inputs(12, batch=2, time=9, dim=3, width=4)
  whole, last, pieces, carried = _whole_and_two_pieces(pool, batch, time, width, dim, cut)
  np.testing.assert_allclose(pieces, whole, atol=ATOL)
  np.testing.assert_array_equal(carried, last)


def test_packed_row_equals_documents_run_separately():
  x, weight, bias, _ = _inputs(5, batch=1, time=12)
  lengths = [5, 1, 6]
  segment_ids = jnp.asarray([np.repeat([3, 7, 8], lengths)], jnp.int32)
  packed, _ = _conv(x, weight, bias=bias, segment_ids=segment_ids)
  starts = np.cumsum([0] + lengths)
  for a, b in zip(starts[:-1], starts[1:]):
    alone, _ = ops.causal_conv1d(x[:, a:b], weight, bias=bias)
    np.testing.assert_allclose(packed[:, a:b], alone, atol=ATOL)


def test_carried_state_flows_into_the_first_document_only():
  x, weight, _, state = _inputs(6, batch=1, time=9)
  segment_ids = jnp.asarray([[0] * 4 + [1] * 5], jnp.int32)
  packed, _ = _conv(x, weight, state=state, segment_ids=segment_ids)
  np.testing.assert_allclose(packed[:, :4], _reference(x[:, :4], weight, state=state), atol=ATOL)
  np.testing.assert_allclose(packed[:, 4:], _reference(x[:, 4:], weight), atol=ATOL)


def test_state_drops_inputs_of_a_document_that_ended():
  x, weight, _, state = _inputs(7, batch=1, time=5)
  segment_ids = jnp.asarray([[0, 0, 0, 0, 1]], jnp.int32)
  _, new_state = _conv(x, weight, state=state, segment_ids=segment_ids)
  np.testing.assert_array_equal(new_state[:, :2], 0)
  np.testing.assert_array_equal(new_state[:, 2], x[:, 4])


def test_packed_pieces_cut_inside_documents_equal_packed_whole_row():
  x, weight, bias, _ = _inputs(8, batch=2, time=11)
  segment_ids = jnp.asarray([[0] * 3 + [1] * 2 + [2] * 6, [5] * 7 + [6] * 4], jnp.int32)
  whole, last = _conv(x, weight, bias=bias, segment_ids=segment_ids)
  # Cuts at 4 and 6 fall inside documents in both rows: the state carries no
  # ids, so a call cannot tell a document that starts at its first position
  # from a continuation.
  out, carried = _run_in_pieces(x, weight, [4, 2, 5], segment_ids=segment_ids, bias=bias)
  np.testing.assert_allclose(out, whole, atol=ATOL)
  np.testing.assert_array_equal(carried, last)


def test_gradients_match_banded_matmul():
  x, weight, bias, state = _inputs(9)
  projection = jax.random.normal(_key(90), x.shape)

  def loss(fn, x, weight, bias, state):
    return jnp.sum(fn(x, weight, bias, state) * projection)

  def op(x, weight, bias, state):
    return ops.causal_conv1d(x, weight, bias=bias, state=state)[0]

  args = (x, weight, bias, state)
  grads = jax.jit(jax.grad(functools.partial(loss, op), argnums=(0, 1, 2, 3)))(*args)
  expected = jax.grad(functools.partial(loss, _toeplitz_conv), argnums=(0, 1, 2, 3))(*args)
  for name, g, e in zip(("x", "weight", "bias", "state"), grads, expected):
    np.testing.assert_allclose(g, e, atol=GRAD_ATOL, err_msg=f"d loss / d {name}")


def test_output_dtype_follows_inputs():
  x, weight, _, _ = _inputs(10)
  y, state = _conv(x.astype(jnp.bfloat16), weight.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and state.dtype == jnp.bfloat16


@pytest.mark.parametrize("bad,match", [
    ("x", r"^x has shape \[2, 55\]; expected \[B, T, D\]$"),
    ("weight", r"^weight has shape \[4, 3\]; expected \[W, 5\] with W ≥ 1$"),
    ("bias", r"^bias has shape \[4\]; expected \[5\]$"),
    ("state", r"^state has shape \[2, 2, 5\]; expected \[2, 3, 5\]$"),
    ("segment_ids", r"^segment_ids has shape \[2, 10\]; expected \[2, 11\]$"),
])
def test_bad_shapes_raise_naming_the_argument(bad, match):
  x, weight, bias, state = _inputs(11)
  segment_ids = jnp.zeros((2, 11), jnp.int32)
  if bad == "x":
    x = x.reshape(2, 55)
  elif bad == "weight":
    weight = weight[:, :3]
  elif bad == "bias":
    bias = bias[:4]
  elif bad == "state":
    state = state[:, 1:]
  elif bad == "segment_ids":
    segment_ids = segment_ids[:, 1:]
  with pytest.raises(ValueError, match=match):
    ops.causal_conv1d(x, weight, bias=bias, state=state, segment_ids=segment_ids)


def test_gradients_with_segment_ids_match_a_masked_banded_matmul():
  x, weight, bias, state = _inputs(12, time=13)
  segment_ids = jnp.asarray([[0] * 5 + [1] * 2 + [2] * 6, [4] * 9 + [5] * 4])
  projection = jax.random.normal(_key(120), x.shape)

  def masked_band(x, weight, bias, state):
    width, time = weight.shape[0], x.shape[1]
    xs = jnp.concatenate([state, x], axis=1)
    xs_seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], width - 1, 1), segment_ids], 1)
    offset = jnp.arange(time + width - 1)[None, :] - jnp.arange(time)[:, None]
    band = jnp.where(((offset >= 0) & (offset < width))[..., None],
                     weight[jnp.clip(offset, 0, width - 1)], 0)  # [T, T+W−1, D]
    same = segment_ids[:, :, None] == xs_seg[:, None, :]  # [B, T, T+W−1]
    return jnp.einsum("bsd,btsd->btd", xs, jnp.where(same[..., None], band, 0)) + bias

  def op(x, weight, bias, state):
    return ops.causal_conv1d(x, weight, bias=bias, state=state, segment_ids=segment_ids)[0]

  loss = lambda fn, *args: jnp.sum(fn(*args) * projection)
  args = (x, weight, bias, state)
  grads = jax.grad(functools.partial(loss, op), argnums=(0, 1, 2, 3))(*args)
  expected = jax.grad(functools.partial(loss, masked_band), argnums=(0, 1, 2, 3))(*args)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
