"""Specification of ops.linear_attention: every form equals the oracle.

Tolerances: errors are measured as max|x − ref| / max|ref| (per array);
float32 forms must agree within F32_TOL, bfloat16 inputs within BF16_TOL of
the float32 oracle run on the same (rounded) inputs.
"""

import functools
import importlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import ops
from tests.ops._close import assert_close

la_module = importlib.import_module("recurrent_lm.ops.linear_attention")

F32_TOL = 2e-4
BF16_TOL = 3e-2
# Under decays of e^-40 per token the log-decay gradients sum terms spanning
# many orders of magnitude; both forms run in float32.
EXTREME_DECAY_TOL = 1e-3
LENGTHS = (1, 7, 63, 64, 65, 300)


def _inputs(seed, *, batch=2, time=65, heads=2, dk=8, dv=6, decay="scalar",
            segments=False, normalize=False, decay_bias=2.0):
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (batch, time, heads, dk))
  k = jax.random.normal(keys[1], (batch, time, heads, dk))
  v = jax.random.normal(keys[2], (batch, time, heads, dv))
  if normalize:  # positive features, as a feature map would give
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  log_decay = None
  if decay != "none":
    shape = (batch, time, heads) if decay == "scalar" else (batch, time, heads, dk)
    log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape) + decay_bias)
  s0 = jax.random.normal(keys[4], (batch, heads, dk, dv))
  state = (jnp.abs(s0), jnp.abs(s0[..., 0]) + 1.0) if normalize else s0
  segment_ids = None
  if segments:
    segment_ids = jnp.cumsum(jax.random.bernoulli(keys[5], 0.04, (batch, time)), 1)
  cotangent = jax.random.normal(keys[6], (batch, time, heads, dv))
  return q, k, v, log_decay, state, segment_ids, cotangent


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size", "causal", "normalize"))
def _outputs_and_grads(q, k, v, log_decay, state, segment_ids, cotangent, *, impl,
                       chunk_size, causal=True, normalize=False):
  """(o, final state, d/d(q, k, v, log_decay, initial state)) of a random projection."""

  def run(q, k, v, log_decay, state):
    return ops.linear_attention(
        q, k, v, log_decay=log_decay, normalize=normalize, initial_state=state,
        segment_ids=segment_ids, causal=causal, chunk_size=chunk_size, impl=impl)

  (o, final), vjp = jax.vjp(run, q, k, v, log_decay, state)
  state_cotangent = jax.tree.map(lambda s: jnp.cos(s), final)
  grads = vjp((cotangent.astype(o.dtype), state_cotangent))
  return o, final, grads


def _check_against_oracle(args, impl, chunk_size, tol, **kw):
  ref = _outputs_and_grads(*args, impl="recurrent", chunk_size=16, **kw)
  got = _outputs_and_grads(*args, impl=impl, chunk_size=chunk_size, **kw)
  assert_close(got[0], ref[0], tol, "output")
  assert_close(got[1], ref[1], tol, "final state")
  assert_close(got[2], ref[2], tol, "gradients")


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("time", LENGTHS)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_matches_recurrent(chunk_size, time, decay, segments):
  args = _inputs(time + chunk_size, time=time, decay=decay, segments=segments)
  _check_against_oracle(args, "chunked", chunk_size, F32_TOL)


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("time", LENGTHS)
def test_parallel_matches_recurrent(time, decay, segments):
  args = _inputs(time, time=time, decay=decay, segments=segments)
  _check_against_oracle(args, "parallel", 64, F32_TOL)


@pytest.mark.parametrize("impl", ["parallel", "chunked"])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("causal", [True, False])
def test_normalized_forms_match_recurrent(impl, decay, causal):
  args = _inputs(3, time=65, decay=decay, segments=True, normalize=True)
  _check_against_oracle(args, impl, 16, F32_TOL, causal=causal, normalize=True)


@pytest.mark.parametrize("impl", ["parallel", "chunked"])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("segments", [False, True])
def test_noncausal_forms_match_recurrent(impl, decay, segments):
  args = _inputs(4, time=63, decay=decay, segments=segments)
  _check_against_oracle(args, impl, 16, F32_TOL, causal=False)


@pytest.mark.parametrize("decay", ["scalar", "vector"])
@pytest.mark.parametrize("time", [65, 300])
def test_bfloat16_inputs_match_float32_oracle(time, decay):
  args = _inputs(5, time=time, decay=decay, segments=True)
  q, k, v, g, s0, seg, ct = args
  bf16 = lambda x: x.astype(jnp.bfloat16)
  rounded = lambda x: bf16(x).astype(jnp.float32)
  ref = _outputs_and_grads(rounded(q), rounded(k), rounded(v), rounded(g), s0, seg, ct,
                           impl="recurrent", chunk_size=16)
  got = _outputs_and_grads(bf16(q), bf16(k), bf16(v), bf16(g), s0, seg, ct,
                           impl="chunked", chunk_size=64)
  assert got[0].dtype == jnp.bfloat16
  assert got[1].dtype == jnp.float32  # the state accumulates in float32
  assert_close(got[0], ref[0], BF16_TOL, "output")
  assert_close(got[1], ref[1], BF16_TOL, "final state")
  assert_close(got[2], ref[2], BF16_TOL, "gradients")


def _numpy_oracle(q, k, v, log_decay, s0, segment_ids, *, causal, normalize):
  """The equations of the module docstring, in float64 loops."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, time, heads, dk = q.shape
  q = q * dk ** -0.5
  if normalize:
    v = np.concatenate([v, np.ones_like(v[..., :1])], -1)
    s0 = np.concatenate([np.asarray(s0[0]), np.asarray(s0[1])[..., None]], -1)
  g = np.zeros((batch, time, heads, 1)) if log_decay is None else np.asarray(log_decay, np.float64)
  g = g[..., None] if g.ndim == 3 else g
  seg = np.zeros((batch, time), int) if segment_ids is None else np.asarray(segment_ids)
  states = np.zeros((batch, time) + s0.shape[1:])
  for b in range(batch):
    state = np.asarray(s0[b], np.float64)
    for t in range(time):
      if t > 0 and seg[b, t] != seg[b, t - 1]:
        state = np.zeros_like(state)
      state = np.exp(g[b, t])[..., None] * state + k[b, t][..., None] * v[b, t][..., None, :]
      states[b, t] = state
  read = states.copy()
  if not causal:
    for b in range(batch):
      for t in range(time):
        end = t
        while end + 1 < time and seg[b, end + 1] == seg[b, t]:
          end += 1
        read[b, t] = states[b, end]
  o = np.einsum("bthk,bthkv->bthv", q, read)
  if normalize:
    o = o[..., :-1] / (o[..., -1:] + la_module._EPS)
  return o, states[:, -1]


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_recurrent_oracle_matches_the_equations(decay, causal, normalize):
  q, k, v, g, s0, seg, _ = _inputs(6, time=23, decay=decay, segments=True, normalize=normalize)
  seg = seg.at[:, 10].add(5)  # a guaranteed boundary mid-row
  seg = jnp.cumsum(jnp.diff(seg, axis=1, prepend=seg[:, :1]) != 0, axis=1)
  o, state = ops.linear_attention(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg,
                                  causal=causal, normalize=normalize, impl="recurrent")
  ref_o, ref_state = _numpy_oracle(q, k, v, g, s0, seg, causal=causal, normalize=normalize)
  assert_close(o, ref_o, 1e-5, "output")
  if normalize:
    state = jnp.concatenate([state[0], state[1][..., None]], -1)
  assert_close(state, ref_state, 1e-5, "state")


@pytest.mark.parametrize("impl", ["auto", "chunked", "parallel"])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("normalize", [False, True])
def test_state_passing_whole_equals_pieces_equals_tokens(impl, decay, normalize):
  q, k, v, g, s0, _, _ = _inputs(7, time=50, decay=decay, normalize=normalize)

  @jax.jit
  def run_slice(q, k, v, g, state):
    return ops.linear_attention(q, k, v, log_decay=g, normalize=normalize,
                                initial_state=state, chunk_size=16, impl=impl)

  run = lambda lo, hi, state: run_slice(
      q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], None if g is None else g[:, lo:hi], state)
  whole_o, whole_state = run(0, 50, s0)

  cuts = [0, 1, 9, 26, 27, 50]  # pieces of 1, 8, 17, 1 and 23 tokens
  state, pieces = s0, []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    o, state = run(lo, hi, state)
    pieces.append(o)
  assert_close(jnp.concatenate(pieces, 1), whole_o, F32_TOL, "pieces output")
  assert_close(state, whole_state, F32_TOL, "pieces state")

  state, tokens = s0, []
  for t in range(50):
    o, state = run(t, t + 1, state)
    tokens.append(o)
  assert_close(jnp.concatenate(tokens, 1), whole_o, F32_TOL, "token output")
  assert_close(state, whole_state, F32_TOL, "token state")


@pytest.mark.parametrize("impl", ["chunked", "parallel"])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_packed_row_equals_documents_run_separately(impl, decay):
  q, k, v, g, _, _, _ = _inputs(8, batch=1, time=70, decay=decay)
  bounds = [0, 13, 14, 51, 70]
  segment_ids = jnp.concatenate(
      [jnp.full((1, hi - lo), i) for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))], 1)
  packed, packed_state = ops.linear_attention(
      q, k, v, log_decay=g, segment_ids=segment_ids, chunk_size=16, impl=impl)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    alone, alone_state = ops.linear_attention(
        q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], log_decay=None if g is None else g[:, lo:hi],
        chunk_size=16, impl=impl)
    assert_close(packed[:, lo:hi], alone, F32_TOL, f"document [{lo}, {hi})")
  assert_close(packed_state, alone_state, F32_TOL, "final state = last document's")


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_chunked_survives_decays_that_underflow_a_chunk(decay):
  # log-decays near −40 per token: a 64-chunk decays by e^−2560, far past
  # float32 range; any form that divides by cumulated decays overflows.
  args = _inputs(9, time=130, decay=decay, decay_bias=-40.0, segments=True)
  assert float(jnp.min(args[3])) < -30
  _check_against_oracle(args, "chunked", 64, EXTREME_DECAY_TOL)


def test_chunked_memory_grows_linearly_in_length():
  """No O(T²) buffer anywhere in the chunked forward and backward."""

  def temp_bytes(time):
    q, k, v, g, _, _, ct = _inputs(10, batch=1, time=time, heads=1, dk=16, dv=16,
                                   decay="vector")
    loss = lambda q, k, v, g: jnp.sum(
        ops.linear_attention(q, k, v, log_decay=g, impl="chunked")[0] * ct)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, g).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(4096), temp_bytes(16384)
  assert large / small < 4.5, (small, large)  # quadratic would give ~16


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(
    batch=st.integers(1, 2), time=st.integers(1, 90), heads=st.integers(1, 3),
    dk=st.sampled_from([1, 4, 8]), dv=st.sampled_from([1, 5]),
    chunk_size=st.sampled_from([8, 16, 32, 64]), decay=st.sampled_from(["none", "scalar", "vector"]),
    segments=st.booleans(), seed=st.integers(0, 2**16))
def test_property_chunked_equals_recurrent_on_random_shapes(
    batch, time, heads, dk, dv, chunk_size, decay, segments, seed):
  q, k, v, g, s0, seg, _ = _inputs(seed, batch=batch, time=time, heads=heads, dk=dk, dv=dv,
                                   decay=decay, segments=segments)
  ref = ops.linear_attention(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg,
                             impl="recurrent")
  got = ops.linear_attention(q, k, v, log_decay=g, initial_state=s0, segment_ids=seg,
                             chunk_size=chunk_size, impl="chunked")
  assert_close(got, ref, F32_TOL)


@pytest.mark.parametrize("time", [1, 64, 8192])
def test_auto_picks_chunked_on_cpu(time):
  call = dict(time=time, decay="scalar", causal=True, normalize=False, dtype=jnp.float32,
              chunk_size=64)
  assert la_module.REGISTRY.resolve("auto", **call).name == "chunked"


def test_auto_skips_implementations_that_do_not_support_the_call():
  registry = la_module.REGISTRY
  order = registry.auto_order("cpu")
  registry.register("kernel", la_module._recurrent, supports=lambda *, time, **_: time % 8 == 0)
  registry.set_auto_order("cpu", ("kernel",) + order)
  try:
    assert registry.resolve("auto", time=16).name == "kernel"
    assert registry.resolve("auto", time=17).name == order[0]
  finally:
    registry.set_auto_order("cpu", order)
    registry._impls.pop("kernel")


def test_explicit_impl_that_does_not_support_the_call_raises():
  registry = la_module.REGISTRY
  registry.register("only_short", la_module._recurrent,
                    supports=lambda *, time, **_: time < 10)
  try:
    q, k, v, *_ = _inputs(11, time=12, decay="none")
    with pytest.raises(ValueError, match="impl='only_short' does not support"):
      ops.linear_attention(q, k, v, impl="only_short")
    assert ops.linear_attention(q[:, :5], k[:, :5], v[:, :5], impl="only_short")[0].shape == (
        2, 5, 2, 6)
  finally:
    registry._impls.pop("only_short")


@pytest.mark.parametrize("bad, message", [
    (dict(k=jnp.ones((2, 5, 2, 7))), r"k has shape \[2, 5, 2, 7\]; expected \[2, 5, 2, 8\]"),
    (dict(v=jnp.ones((2, 5, 3, 6))), r"v has shape \[2, 5, 3, 6\]; expected \[B, T, H, V\]"),
    (dict(log_decay=-jnp.ones((2, 5, 8))), r"log_decay has shape \[2, 5, 8\]; expected \[B, T, H\]"),
    (dict(log_decay=jnp.full((2, 5, 2), 0.5)), r"log_decay has a positive entry \(0.5\)"),
    (dict(initial_state=jnp.ones((2, 2, 8, 5))), r"initial_state has shape \[2, 2, 8, 5\]"),
    (dict(segment_ids=jnp.ones((2, 4), jnp.int32)), r"segment_ids has shape \[2, 4\]"),
    (dict(segment_ids=jnp.ones((2, 5))), r"segment_ids has dtype float32; expected an integer"),
    (dict(chunk_size=0), r"chunk_size=0; expected a positive int"),
    (dict(impl="fast"), r"impl='fast' is not one of"),
    (dict(q=jnp.ones((2, 5, 2, 8), jnp.int32)), r"q has dtype int32; expected a floating"),
])
def test_bad_arguments_raise_one_clear_line(bad, message):
  args = dict(q=jnp.ones((2, 5, 2, 8)), k=jnp.ones((2, 5, 2, 8)), v=jnp.ones((2, 5, 2, 6)))
  args.update(bad)
  with pytest.raises((ValueError, TypeError), match=message):
    ops.linear_attention(**args)


def test_normalize_requires_the_state_pair():
  q = jnp.ones((1, 3, 1, 4))
  with pytest.raises(ValueError, match=r"initial_state must be the pair \(S, z\)"):
    ops.linear_attention(q, q, q, normalize=True, initial_state=jnp.ones((1, 1, 4, 4)))
