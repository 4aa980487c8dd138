"""Specification of ops.selective_scan (Mamba S6): every form equals the oracle.

Errors are max|x − ref| / max|ref| per array; float32 forms agree within
F32_TOL (outputs, final state and the gradients w.r.t. every input), bfloat16
inputs within BF16_TOL of the float32 oracle run on the same (rounded)
inputs; the oracle matches a float64 NumPy loop within NUMPY_TOL.

Shapes are tiny, so compiling dominates the run time: inputs are drawn by
NumPy (no compile per shape), the jitted functions are shared between tests
(equal shapes reuse one executable), and they are compiled at XLA's backend
(LLVM) optimisation level 0, which more than halves compile time on CPU; the
tolerances hold at the default level too.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import ops
from tests.ops._close import assert_close

ss_module = importlib.import_module("recurrent_lm.ops.selective_scan")

F32_TOL = 1e-5  # worst measured: 9e-7
BF16_TOL = 3e-2  # worst measured: 1e-2 (bfloat16 rounding of y and of the gradients)
NUMPY_TOL = 1e-5
# Log-decays near −40 per step: sums spanning dozens of orders of magnitude
# (worst measured: 2.5e-6).
EXTREME_DECAY_TOL = 5e-5
LENGTHS = (1, 7, 63, 64, 65)
FORMS = ("associative", "chunked")
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs(seed, *, batch=2, time=65, channels=4, state=3, groups=None, segments=False,
            dt_shift=-1.0):
  """Fresh random inputs (drawn by NumPy: no XLA compile per shape)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  x = normal(batch, time, channels)
  dt = np.logaddexp(0.0, normal(batch, time, channels) + dt_shift)  # softplus: Δ > 0
  a = -np.exp(normal(channels, state))
  bc_shape = (batch, time, state) if groups is None else (batch, time, groups, state)
  b, c = normal(*bc_shape), normal(*bc_shape)
  d = normal(channels)
  h0 = normal(batch, channels, state)
  seg = np.cumsum(rng.random((batch, time)) < 0.06, axis=1, dtype=np.int32) if segments else None
  cotangent = normal(batch, time, channels)
  x, dt, a, b, c, d, h0, cotangent = (jnp.asarray(v, jnp.float32)
                                      for v in (x, dt, a, b, c, d, h0, cotangent))
  seg = None if seg is None else jnp.asarray(seg)
  return x, dt, a, b, c, d, h0, seg, cotangent


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"),
                   compiler_options=_FAST_COMPILE)
def _outputs_and_grads(x, dt, a, b, c, d, h0, seg, cotangent, *, impl, chunk_size=16):
  """(y, final state, d/d(x, dt, A, B, C, D, initial state)) of a random projection."""

  def run(x, dt, a, b, c, d, h0):
    return ops.selective_scan(x, dt, a, b, c, D=d, initial_state=h0, segment_ids=seg,
                              impl=impl, chunk_size=chunk_size)

  (y, state), vjp = jax.vjp(run, x, dt, a, b, c, d, h0)
  return y, state, vjp((cotangent.astype(y.dtype), jnp.cos(state)))


def _check_against_oracle(args, impl, tol, chunk_size=16):
  ref = _outputs_and_grads(*args, impl="recurrent")
  got = _outputs_and_grads(*args, impl=impl, chunk_size=chunk_size)
  assert_close(got[0], ref[0], tol, "output")
  assert_close(got[1], ref[1], tol, "final state")
  for name, g, g_ref in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), got[2], ref[2]):
    assert_close(g, g_ref, tol, f"gradient w.r.t. {name}")


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("time", LENGTHS)
@pytest.mark.parametrize("impl", FORMS)
def test_forms_match_recurrent(impl, time, segments):
  _check_against_oracle(_inputs(time, time=time, segments=segments), impl, F32_TOL)


@pytest.mark.parametrize("chunk_size", [6])
def test_chunked_matches_recurrent_for_any_chunk_size(chunk_size):
  _check_against_oracle(_inputs(65, time=65, segments=True), "chunked", F32_TOL, chunk_size)


@pytest.mark.parametrize("impl", FORMS)
def test_grouped_b_and_c_match_recurrent(impl):
  _check_against_oracle(_inputs(12, time=7, groups=2, segments=True), impl, F32_TOL, 3)


@pytest.mark.parametrize("impl", FORMS)
def test_bfloat16_inputs_match_float32_oracle(impl):
  x, dt, a, b, c, d, h0, seg, ct = _inputs(5, time=65, segments=True)
  bf16 = lambda v: v.astype(jnp.bfloat16)
  rounded = lambda v: bf16(v).astype(jnp.float32)
  ref = _outputs_and_grads(*map(rounded, (x, dt, a, b, c, d)), h0, seg, ct, impl="recurrent")
  got = _outputs_and_grads(*map(bf16, (x, dt, a, b, c, d)), h0, seg, ct, impl=impl)
  assert got[0].dtype == jnp.bfloat16
  assert got[1].dtype == jnp.float32  # the state accumulates in float32
  assert_close(got[0], ref[0], BF16_TOL, "output")
  assert_close(got[1], ref[1], BF16_TOL, "final state")
  assert_close(got[2], ref[2], BF16_TOL, "gradients")


@pytest.mark.parametrize("impl", FORMS)
def test_forms_survive_decays_that_underflow_a_chunk(impl):
  # Δ·A near −40 per step: a 16-chunk decays by e^−640, far past float32
  # range; a form that divides by cumulated decays would overflow.
  x, dt, a, b, c, d, h0, seg, ct = _inputs(9, time=65, segments=True)
  dt = dt + 40.0
  assert float(jnp.max(dt[..., None] * a)) < 0 and float(jnp.min(dt[..., None] * a)) < -30
  _check_against_oracle((x, dt, a, b, c, d, h0, seg, ct), impl, EXTREME_DECAY_TOL)


def _numpy_oracle(x, dt, a, b, c, d, h0, segment_ids):
  """The equations of the module docstring, in float64 loops."""
  x, dt, a, b, c, d, h0 = (np.asarray(v, np.float64) for v in (x, dt, a, b, c, d, h0))
  batch, time, channels = x.shape
  if b.ndim == 3:
    b, c = b[:, :, None], c[:, :, None]
  group_of = np.arange(channels) // (channels // b.shape[2])  # contiguous channel blocks
  seg = np.asarray(segment_ids)
  y = np.zeros_like(x)
  states = np.zeros((batch, channels, a.shape[1]))
  for i in range(batch):
    h = h0[i].copy()
    for t in range(time):
      if t > 0 and seg[i, t] != seg[i, t - 1]:
        h = np.zeros_like(h)
      for ch in range(channels):
        g = group_of[ch]
        h[ch] = np.exp(dt[i, t, ch] * a[ch]) * h[ch] + dt[i, t, ch] * b[i, t, g] * x[i, t, ch]
        y[i, t, ch] = c[i, t, g] @ h[ch] + d[ch] * x[i, t, ch]
    states[i] = h
  return y, states


@pytest.mark.parametrize("groups", [None, 2])
def test_recurrent_oracle_matches_the_equations(groups):
  x, dt, a, b, c, d, h0, _, _ = _inputs(6, time=20, groups=groups)
  seg = jnp.asarray([[0] * 6 + [1] * 9 + [2] * 5, [3] * 11 + [7] * 9])
  y, state = jax.jit(functools.partial(ops.selective_scan, impl="recurrent"),
                     compiler_options=_FAST_COMPILE)(
      x, dt, a, b, c, D=d, initial_state=h0, segment_ids=seg)
  ref_y, ref_state = _numpy_oracle(x, dt, a, b, c, d, h0, seg)
  assert_close(y, ref_y, NUMPY_TOL, "output")
  assert_close(state, ref_state, NUMPY_TOL, "state")


@functools.partial(jax.jit, static_argnames="impl", compiler_options=_FAST_COMPILE)
def _run(x, dt, a, b, c, d, h0, seg=None, *, impl):
  return ops.selective_scan(x, dt, a, b, c, D=d, initial_state=h0, segment_ids=seg,
                            impl=impl, chunk_size=4)


@pytest.mark.parametrize("impl", ("auto",) + FORMS)
def test_state_passing_whole_equals_pieces_equals_tokens(impl):
  x, dt, a, b, c, d, h0, _, _ = _inputs(7, time=25)
  run = lambda lo, hi, state: _run(x[:, lo:hi], dt[:, lo:hi], a, b[:, lo:hi], c[:, lo:hi], d,
                                   state, impl=impl)
  whole_y, whole_state = run(0, 25, h0)
  for cuts in ([0, 1, 9, 17, 25], list(range(26))):  # pieces of 1, 8, 8, 8; single tokens
    state, pieces = h0, []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      y, state = run(lo, hi, state)
      pieces.append(y)
    assert_close(jnp.concatenate(pieces, 1), whole_y, F32_TOL, f"output, cuts {cuts}")
    assert_close(state, whole_state, F32_TOL, f"state, cuts {cuts}")


@pytest.mark.parametrize("impl", FORMS)
def test_packed_row_equals_documents_run_separately(impl):
  x, dt, a, b, c, d, h0, _, _ = _inputs(8, time=17)
  fresh = jnp.zeros_like(h0)  # a document alone starts from the zero state
  bounds = [0, 8, 9, 17]
  seg = jnp.asarray([[0] * 8 + [1] + [2] * 8] * 2)
  packed, packed_state = _run(x, dt, a, b, c, d, h0, seg, impl=impl)
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    alone, alone_state = _run(x[:, lo:hi], dt[:, lo:hi], a, b[:, lo:hi], c[:, lo:hi], d,
                              h0 if lo == 0 else fresh, impl=impl)
    assert_close(packed[:, lo:hi], alone, F32_TOL, f"document [{lo}, {hi})")
  assert_close(packed_state, alone_state, F32_TOL, "final state = last document's")


def test_chunked_never_materialises_the_expanded_state():
  """Forward + backward temporaries stay below one [B, T, D, N] float32 tensor
  (the recurrent form's autodiff keeps ~5 of them, associative ~14)."""
  batch, time, channels, state = 1, 8192, 8, 64
  x, dt, a, b, c, _, _, _, ct = _inputs(10, batch=batch, time=time, channels=channels,
                                        state=state)
  loss = lambda *args: jnp.sum(ops.selective_scan(*args, impl="chunked")[0] * ct)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), compiler_options=_FAST_COMPILE)
  temp = grad.lower(x, dt, a, b, c).compile().memory_analysis().temp_size_in_bytes
  expanded = batch * time * channels * state * 4
  assert temp < expanded, (temp, expanded)  # measured: 0.45 of it on CPU


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU order")
@pytest.mark.parametrize("time", [1, 2048])
def test_auto_picks_recurrent_on_cpu(time):
  call = dict(time=time, groups=1, dtype=jnp.float32, chunk_size=16)
  assert ss_module.REGISTRY.resolve("auto", **call).name == "recurrent"


def _good_args():
  return dict(x=jnp.ones((2, 5, 4)), dt=jnp.ones((2, 5, 4)), A=-jnp.ones((4, 3)),
              B=jnp.ones((2, 5, 3)), C=jnp.ones((2, 5, 3)))


@pytest.mark.parametrize("bad, message", [
    (dict(x=jnp.ones((2, 5))), r"x has shape \[2, 5\]; expected \[B, T, D\]"),
    (dict(x=jnp.ones((2, 5, 4), jnp.int32)), r"x has dtype int32; expected a floating"),
    (dict(dt=jnp.ones((2, 5, 3))), r"dt has shape \[2, 5, 3\]; expected \[2, 5, 4\]"),
    (dict(dt=jnp.full((2, 5, 4), -0.5)), r"dt has a negative entry \(-0.5\); expected step"),
    (dict(A=-jnp.ones((3, 3))), r"A has shape \[3, 3\]; expected \[D, N\] = \[4, N\]"),
    (dict(A=jnp.full((4, 3), 0.25)), r"A has a positive entry \(0.25\); expected A ≤ 0"),
    (dict(B=jnp.ones((2, 5, 2))), r"B has shape \[2, 5, 2\]; expected \[B, T, N\] = \[2, 5, 3\]"),
    (dict(B=jnp.ones((2, 5, 3, 3))), r"B has shape \[2, 5, 3, 3\]; .* G dividing D = 4"),
    (dict(C=jnp.ones((2, 5, 2, 3))), r"C has shape \[2, 5, 2, 3\]; expected \[2, 5, 3\]"),
    (dict(D=jnp.ones((3,))), r"D has shape \[3\]; expected \[4\]"),
    (dict(initial_state=jnp.ones((2, 3, 4))),
     r"initial_state has shape \[2, 3, 4\]; expected \[2, 4, 3\]"),
    (dict(segment_ids=jnp.ones((2, 4), jnp.int32)), r"segment_ids has shape \[2, 4\]"),
    (dict(segment_ids=jnp.ones((2, 5))), r"segment_ids has dtype float32; expected an integer"),
    (dict(chunk_size=0), r"chunk_size=0; expected a positive int"),
    (dict(impl="fast"), r"impl='fast' is not one of"),
])
def test_bad_arguments_raise_one_clear_line(bad, message):
  args = _good_args()
  args.update(bad)
  with pytest.raises((ValueError, TypeError), match=message):
    ops.selective_scan(**args)
