"""softmax_attention: the masked-softmax reference, state passing through the
KV cache (full and ring buffer), gradients, overflow and argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import ops

# Counter-based "rbg" keys: threefry's compile time would dominate these small tests.
_key = functools.partial(jax.random.key, impl="rbg")

# float32 with "highest" matmul precision (conftest): only summation order differs.
ATOL = 2e-5
RTOL = 2e-5
GRAD_ATOL = 1e-4

_attention = jax.jit(ops.softmax_attention, static_argnames=("window", "scale"))
_write = jax.jit(ops.write_kv_cache)


def _inputs(seed, batch=2, time=13, heads=4, kv_heads=2, head_dim=8, value_dim=8):
  kq, kk, kv = jax.random.split(_key(seed), 3)
  q = jax.random.normal(kq, (batch, time, heads, head_dim))
  k = jax.random.normal(kk, (batch, time, kv_heads, head_dim))
  v = jax.random.normal(kv, (batch, time, kv_heads, value_dim))
  return q, k, v


def _mask(time, window=None, segment_ids=None):
  """``[B or 1, T, T]`` bool: query i sees key j."""
  i = np.arange(time)[:, None]
  j = np.arange(time)[None, :]
  mask = j <= i
  if window is not None:
    mask &= i - j < window
  mask = mask[None]
  if segment_ids is not None:
    segment_ids = np.asarray(segment_ids)
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


@functools.partial(jax.jit, static_argnames=("scale",))
def _reference(q, k, v, mask, scale=None):
  """Plain masked softmax attention; kv heads repeated for grouped queries."""
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  v = jnp.repeat(v, groups, axis=2)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale
  logits = jnp.where(jnp.asarray(mask)[:, None], logits, -jnp.inf)
  return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)


def _segments(seed, batch, time, num=3):
  """Sorted random document ids per row, as a packer would produce."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, num, (batch, time)), axis=1), jnp.int32)


def _random_pieces(seed, time):
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.choice(np.arange(1, time), size=min(3, time - 1), replace=False))
  return np.diff(np.concatenate([[0], cuts, [time]])).tolist()


def _run_in_pieces(q, k, v, pieces, cache, window=None, segment_ids=None):
  outs, start = [], 0
  for length in pieces:
    piece = slice(start, start + length)
    seg = None if segment_ids is None else segment_ids[:, piece]
    o, cache = _attention(q[:, piece], k[:, piece], v[:, piece], window=window,
                          segment_ids=seg, cache=cache)
    outs.append(o)
    start += length
  return jnp.concatenate(outs, axis=1), cache


# --- against the reference --------------------------------------------------


def test_full_causal_attention_matches_reference():
  q, k, v = _inputs(0)
  o, cache = _attention(q, k, v)
  assert cache is None
  np.testing.assert_allclose(o, _reference(q, k, v, _mask(13)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("window", [1, 3, 13, 20])
def test_sliding_window_matches_reference(window):
  q, k, v = _inputs(1)
  o, _ = _attention(q, k, v, window=window)
  np.testing.assert_allclose(o, _reference(q, k, v, _mask(13, window)), atol=ATOL, rtol=RTOL)


def test_window_of_one_returns_own_value():
  q, k, v = _inputs(2, kv_heads=4)
  o, _ = _attention(q, k, v, window=1)
  np.testing.assert_allclose(o, v, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("window", [None, 4])
def test_segment_ids_restrict_attention_to_own_document(window):
  q, k, v = _inputs(3)
  seg = _segments(3, 2, 13)
  o, _ = _attention(q, k, v, window=window, segment_ids=seg)
  np.testing.assert_allclose(
      o, _reference(q, k, v, _mask(13, window, seg)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_heads_read_their_group_kv_head(kv_heads):
  q, k, v = _inputs(4, heads=4, kv_heads=kv_heads)
  o, _ = _attention(q, k, v, window=5)
  np.testing.assert_allclose(o, _reference(q, k, v, _mask(13, 5)), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("value_dim", [3, 12])
def test_value_dim_may_differ_from_head_dim(value_dim):
  q, k, v = _inputs(5, value_dim=value_dim)
  o, _ = _attention(q, k, v)
  assert o.shape == (2, 13, 4, value_dim)
  np.testing.assert_allclose(o, _reference(q, k, v, _mask(13)), atol=ATOL, rtol=RTOL)


def test_explicit_scale_replaces_default():
  q, k, v = _inputs(6)
  o, _ = _attention(q, k, v, scale=0.7)
  np.testing.assert_allclose(o, _reference(q, k, v, _mask(13), 0.7), atol=ATOL, rtol=RTOL)


def test_output_has_query_dtype():
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(7))
  o, _ = _attention(q, k, v, window=3)
  assert o.dtype == jnp.bfloat16
  # bfloat16 inputs, float32 softmax: loose.
  np.testing.assert_allclose(
      o.astype(jnp.float32),
      _reference(*(x.astype(jnp.float32) for x in (q, k, v)), _mask(13, 3)), atol=3e-2)


@pytest.mark.parametrize("window,segmented", [(None, False), (4, True)])
def test_gradients_match_reference(window, segmented):
  q, k, v = _inputs(8, kv_heads=2)
  seg = _segments(8, 2, 13) if segmented else None
  projection = jax.random.normal(_key(80), (2, 13, 4, 8))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * projection)

  def op(q, k, v):
    return ops.softmax_attention(q, k, v, window=window, segment_ids=seg)[0]

  ref = functools.partial(_reference, mask=_mask(13, window, seg))
  grads = jax.jit(jax.grad(functools.partial(loss, op), argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(q, k, v)
  for name, g, e in zip("qkv", grads, expected):
    np.testing.assert_allclose(g, e, atol=GRAD_ATOL, err_msg=f"d loss / d {name}")


@pytest.mark.parametrize("window,time", [(7, 50), (16, 33), (5, 11)])
def test_long_rows_run_the_window_in_blocks_with_reference_outputs_and_gradients(window, time):
  # time > 2·window takes the blocked O(T·window) path.
  q, k, v = _inputs(9, time=time, heads=4, kv_heads=2, value_dim=6)
  seg = _segments(9, 2, time)
  mask = _mask(time, window, seg)
  projection = jax.random.normal(_key(91), (2, time, 4, 6))
  loss = lambda fn, q, k, v: jnp.sum(fn(q, k, v) * projection)
  op = lambda q, k, v: ops.softmax_attention(q, k, v, window=window, segment_ids=seg)[0]
  ref = functools.partial(_reference, mask=mask)
  np.testing.assert_allclose(op(q, k, v), ref(q, k, v), atol=ATOL, rtol=RTOL)
  grads = jax.grad(functools.partial(loss, op), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(q, k, v)
  for name, g, e in zip("qkv", grads, expected):
    np.testing.assert_allclose(g, e, atol=GRAD_ATOL, err_msg=f"d loss / d {name}")


# --- state passing through the cache ----------------------------------------


@pytest.mark.parametrize("segmented", [False, True])
def test_full_attention_pieces_through_cache_equal_whole_sequence(segmented):
  q, k, v = _inputs(9)
  seg = _segments(9, 2, 13) if segmented else None
  whole, _ = _attention(q, k, v, segment_ids=seg)
  cache = ops.init_kv_cache(2, 16, 2, 8)
  pieces, cache = _run_in_pieces(q, k, v, _random_pieces(9, 13), cache, segment_ids=seg)
  np.testing.assert_allclose(pieces, whole, atol=ATOL, rtol=RTOL)
  assert int(cache.index) == 13


def test_full_attention_token_by_token_equals_whole_sequence():
  q, k, v = _inputs(10, kv_heads=1)
  whole, _ = _attention(q, k, v)
  cache = ops.init_kv_cache(2, 13, 1, 8)
  tokens, _ = _run_in_pieces(q, k, v, [1] * 13, cache)
  np.testing.assert_allclose(tokens, whole, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("pieces", [[5, 1, 7], [2, 9, 2], [13], "random"])
def test_sliding_window_ring_buffer_pieces_equal_whole_sequence(pieces):
  window = 4
  q, k, v = _inputs(11)
  seg = _segments(11, 2, 13, num=2)
  whole, _ = _attention(q, k, v, window=window, segment_ids=seg)
  if pieces == "random":
    pieces = _random_pieces(11, 13)
  cache = ops.init_kv_cache(2, window, 2, 8)  # 13 tokens wrap a 4-slot ring.
  out, cache = _run_in_pieces(q, k, v, pieces, cache, window=window, segment_ids=seg)
  np.testing.assert_allclose(out, whole, atol=ATOL, rtol=RTOL)


def test_sliding_window_token_by_token_equals_whole_sequence():
  window = 3
  q, k, v = _inputs(12)
  whole, _ = _attention(q, k, v, window=window)
  cache = ops.init_kv_cache(2, window, 2, 8)
  tokens, _ = _run_in_pieces(q, k, v, [1] * 13, cache, window=window)
  np.testing.assert_allclose(tokens, whole, atol=ATOL, rtol=RTOL)


def test_write_keeps_the_last_capacity_tokens_in_slot_position_mod_capacity():
  _, k, v = _inputs(13, time=7)
  cache = ops.init_kv_cache(2, 3, 2, 8)._replace(index=jnp.int32(5))
  cache = _write(cache, k, v)
  # Absolute positions 5..11; the last three, 9, 10, 11, land in slots 0, 1, 2.
  np.testing.assert_array_equal(cache.positions, [[9, 10, 11]] * 2)
  np.testing.assert_array_equal(cache.k, k[:, 4:])
  np.testing.assert_array_equal(cache.v, v[:, 4:])
  assert int(cache.index) == 12


def test_init_kv_cache_is_empty():
  cache = ops.init_kv_cache(2, 5, 3, 4, jnp.bfloat16, value_dim=6)
  assert cache.k.shape == (2, 5, 3, 4) and cache.k.dtype == jnp.bfloat16
  assert cache.v.shape == (2, 5, 3, 6)
  np.testing.assert_array_equal(cache.positions, -1)
  assert int(cache.index) == 0


# --- never silently wrong ---------------------------------------------------


def test_full_attention_cache_overflow_returns_nan():
  q, k, v = _inputs(14, time=6)
  cache = ops.init_kv_cache(2, 6, 2, 8)
  o, cache = _attention(q[:, :4], k[:, :4], v[:, :4], cache=cache)
  assert np.isfinite(o).all()
  o, cache = _attention(q[:, 4:], k[:, 4:], v[:, 4:], cache=cache)
  assert np.isfinite(o).all()  # index + T == capacity: still fits.
  o, cache = _attention(q[:, :1], k[:, :1], v[:, :1], cache=cache)
  assert np.isnan(o).all()
  o, _ = _attention(q[:, :1], k[:, :1], v[:, :1], cache=cache)
  assert np.isnan(o).all()  # and every later call on the overflowed cache.


def test_sliding_window_cache_smaller_than_window_raises():
  q, k, v = _inputs(15)
  with pytest.raises(ValueError, match=r"capacity 3; expected at least window=4"):
    ops.softmax_attention(q, k, v, window=4, cache=ops.init_kv_cache(2, 3, 2, 8))


@pytest.mark.parametrize("bad,match", [
    ("k", r"^k has shape \[2, 13, 2, 5\]; expected \[2, 13, Hkv, 8\]$"),
    ("v", r"^v has shape \[2, 12, 2, 8\]; expected \[2, 13, 2, Dv\]$"),
    ("q", r"^q has shape \[2, 13, 32\]; expected \[B, T, H, D\]$"),
    ("heads", r"^q has 4 heads and k has 3"),
    ("segment_ids", r"^segment_ids has shape \[2, 12\]; expected \[2, 13\]$"),
    ("cache", r"^cache.k has shape \[2, 6, 1, 8\]; expected \[2, 6, 2, 8\]$"),
])
def test_bad_shapes_raise_naming_the_argument(bad, match):
  q, k, v = _inputs(16)
  kwargs = {}
  if bad == "k":
    k = k[..., :5]
  elif bad == "v":
    v = v[:, :12]
  elif bad == "q":
    q = q.reshape(2, 13, 32)
  elif bad == "heads":
    k, v = (jnp.concatenate([x, x[:, :, :1]], axis=2) for x in (k, v))
  elif bad == "segment_ids":
    kwargs["segment_ids"] = jnp.zeros((2, 12), jnp.int32)
  elif bad == "cache":
    kwargs["cache"] = ops.init_kv_cache(2, 6, 1, 8)
  with pytest.raises(ValueError, match=match):
    ops.softmax_attention(q, k, v, **kwargs)


def test_integer_queries_raise():
  q, k, v = _inputs(17)
  with pytest.raises(TypeError, match=r"^q has dtype int32; expected a floating dtype$"):
    ops.softmax_attention(q.astype(jnp.int32), k, v)
