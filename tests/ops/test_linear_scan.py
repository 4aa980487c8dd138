"""Specification of ops.linear_scan: every form equals the oracle.

Errors are max|x − ref| / max|ref| per array; float32 within F32_TOL,
bfloat16 inputs within BF16_TOL of the float32 oracle on the same inputs.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import ops
from tests.ops._close import assert_close, rel_err

F32_TOL = 1e-5
BF16_TOL = 2e-2
LENGTHS = (1, 7, 63, 64, 65, 300)


def _inputs(seed, batch=2, time=65, rest=(3, 4), segments=False):
  keys = jax.random.split(jax.random.key(seed), 5)
  a = jax.nn.sigmoid(jax.random.normal(keys[0], (batch, time, *rest)) + 1.5)
  b = jax.random.normal(keys[1], (batch, time, *rest))
  h0 = jax.random.normal(keys[2], (batch, *rest))
  seg = jnp.cumsum(jax.random.bernoulli(keys[3], 0.05, (batch, time)), 1) if segments else None
  cotangent = jax.random.normal(keys[4], (batch, time, *rest))
  return a, b, h0, seg, cotangent


@functools.partial(jax.jit, static_argnames=("impl", "reverse", "chunk_size"))
def _outputs_and_grads(a, b, h0, seg, cotangent, *, impl, reverse, chunk_size=64):
  run = lambda a, b, h0: ops.linear_scan(a, b, h0, segment_ids=seg, reverse=reverse,
                                         impl=impl, chunk_size=chunk_size)
  (h, h_last), vjp = jax.vjp(run, a, b, h0)
  return h, h_last, vjp((cotangent.astype(h.dtype), jnp.sin(h_last)))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("time", LENGTHS)
@pytest.mark.parametrize("impl, chunk_size", [("associative", 64), ("chunked", 16), ("chunked", 64)])
def test_forms_match_recurrent(impl, chunk_size, time, segments, reverse):
  args = _inputs(time, time=time, segments=segments)
  ref = _outputs_and_grads(*args, impl="recurrent", reverse=reverse)
  got = _outputs_and_grads(*args, impl=impl, reverse=reverse, chunk_size=chunk_size)
  assert_close(got, ref, F32_TOL)


@pytest.mark.parametrize("impl", ["associative", "chunked"])
def test_bfloat16_inputs_match_float32_oracle(impl):
  a, b, h0, seg, ct = _inputs(1, time=300, segments=True)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  up = lambda x: bf16(x).astype(jnp.float32)
  ref = _outputs_and_grads(up(a), up(b), h0, seg, ct, impl="recurrent", reverse=False)
  got = _outputs_and_grads(bf16(a), bf16(b), h0, seg, ct, impl=impl, reverse=False)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
  assert_close(got, ref, BF16_TOL)


def test_recurrent_matches_a_python_loop():
  a, b, h0, seg, _ = _inputs(2, time=30, rest=(5,), segments=True)
  h, h_last = ops.linear_scan(a, b, h0, segment_ids=seg, impl="recurrent")
  a, b, h0, seg = (np.asarray(x, np.float64) for x in (a, b, h0, seg))
  expected = np.zeros_like(b)
  for i in range(a.shape[0]):
    state = h0[i]
    for t in range(a.shape[1]):
      keep = 0.0 if t > 0 and seg[i, t] != seg[i, t - 1] else 1.0
      state = keep * a[i, t] * state + b[i, t]
      expected[i, t] = state
  assert rel_err(h, expected) < 1e-6
  assert rel_err(h_last, expected[:, -1]) < 1e-6


@pytest.mark.parametrize("impl", ["auto", "associative", "chunked"])
def test_state_passing_whole_equals_pieces_equals_tokens(impl):
  a, b, h0, _, _ = _inputs(3, time=40)
  run = jax.jit(lambda a, b, h: ops.linear_scan(a, b, h, impl=impl, chunk_size=16))
  whole, whole_last = run(a, b, h0)
  for cuts in ([0, 1, 17, 18, 40], list(range(41))):
    h, outs = h0, []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      out, h = run(a[:, lo:hi], b[:, lo:hi], h)
      outs.append(out)
    assert_close((jnp.concatenate(outs, 1), h), (whole, whole_last), F32_TOL)


@pytest.mark.parametrize("impl", ["associative", "chunked"])
def test_packed_row_equals_documents_run_separately(impl):
  a, b, _, _, _ = _inputs(4, batch=1, time=50)
  bounds = [0, 20, 21, 50]
  seg = jnp.asarray([[0] * 20 + [1] + [2] * 29])
  packed, _ = ops.linear_scan(a, b, segment_ids=seg, impl=impl, chunk_size=16)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    alone, _ = ops.linear_scan(a[:, lo:hi], b[:, lo:hi], impl=impl, chunk_size=16)
    assert_close(packed[:, lo:hi], alone, F32_TOL)


def test_reverse_runs_from_the_end():
  a, b, h0, _, _ = _inputs(5, time=9)
  h, h_first = ops.linear_scan(a, b, h0, reverse=True)
  flipped, last = ops.linear_scan(jnp.flip(a, 1), jnp.flip(b, 1), h0)
  assert_close((h, h_first), (jnp.flip(flipped, 1), last), F32_TOL)


def test_zero_decays_are_exact_in_the_chunked_form():
  # a = 0 resets; a form that divides by cumulated products would give NaN.
  a, b, h0, _, _ = _inputs(6, time=64)
  a = a.at[:, ::5].set(0.0)
  ref = ops.linear_scan(a, b, h0, impl="recurrent")
  got = ops.linear_scan(a, b, h0, impl="chunked", chunk_size=16)
  assert_close(got, ref, F32_TOL)


@pytest.mark.slow   # ~50 s; the fixed-shape cases above run in `make test`
@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(batch=st.integers(1, 3), time=st.integers(1, 130),
                  rest=st.sampled_from([(), (1,), (3, 2)]), chunk_size=st.integers(1, 70),
                  segments=st.booleans(), reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_property_forms_agree_on_random_shapes(batch, time, rest, chunk_size, segments,
                                               reverse, seed):
  a, b, h0, seg, _ = _inputs(seed, batch=batch, time=time, rest=rest, segments=segments)
  ref = ops.linear_scan(a, b, h0, segment_ids=seg, reverse=reverse, impl="recurrent")
  for impl in ("associative", "chunked"):
    got = ops.linear_scan(a, b, h0, segment_ids=seg, reverse=reverse, impl=impl,
                          chunk_size=chunk_size)
    assert_close(got, ref, F32_TOL)


@pytest.mark.parametrize("kwargs, message", [
    (dict(b=jnp.ones((2, 5, 4))), r"b has shape \[2, 5, 4\]; expected the shape of a, \[2, 5, 3\]"),
    (dict(h0=jnp.ones((2, 4))), r"h0 has shape \[2, 4\]; expected \[2, 3\]"),
    (dict(a=jnp.ones((5,)), b=jnp.ones((5,))), r"a has shape \[5\]; expected \[B, T, ...\]"),
    (dict(segment_ids=jnp.zeros((2, 6), jnp.int32)), r"segment_ids has shape \[2, 6\]"),
    (dict(impl="magic"), r"impl='magic' is not one of"),
    (dict(chunk_size=-3), r"chunk_size=-3; expected a positive int"),
])
def test_bad_arguments_raise_one_clear_line(kwargs, message):
  args = dict(a=jnp.ones((2, 5, 3)), b=jnp.ones((2, 5, 3)))
  args.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=message):
    ops.linear_scan(**args)
