"""Specification of ops.mlstm: every form equals the oracle, the oracle the equations.

Tolerances: errors are max|x − ref| / max|ref| per array. float32 forms agree
with the recurrent oracle within F32_TOL (outputs, final state and every
gradient); bfloat16 inputs within BF16_TOL of the float32 oracle run on the
same (rounded) inputs; the oracle agrees with a float64 NumPy loop of the
equations within ORACLE_TOL.

Compile time dominates this file, so every test reuses the few shapes of
``CASES`` and the one jitted ``_outputs_and_grads`` (compiled without LLVM's
expensive optimisations, which only speed up the run): the pieces and
documents of the state-passing and packing tests have the lengths of those
cases.
"""

import functools
import importlib

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import ops
from tests.ops._close import assert_close

mlstm_module = importlib.import_module("recurrent_lm.ops.mlstm")

F32_TOL = 2e-4
BF16_TOL = 1e-2
ORACLE_TOL = 1e-5
# Input gates near +100 and forget gates near logσ(−40) per token: e^{−m} ≈ 0
# and the memory holds about one token, so h ≈ v·(q·k̂)/(|q·k̂| + 1e-6), steep
# where q·k̂ ≈ 0; the float32 oracle itself is 2e-4 from a float64 run there.
EXTREME_GATES_TOL = 1e-3
BATCH, HEADS, DK, DV = 2, 2, 8, 6
# (time, chunk_size, segments) of the chunked form; the oracle runs every
# (time, segments) that appears here. Chunk 16 sees one short chunk (1, 7),
# padding by 1 (63), none (64) and by 15 (65); chunk 64 a second chunk of one
# token. Segments at T = 1 would change nothing.
CASES = [(1, 16, False)] + [(time, 16, segments) for time in (7, 63, 64, 65)
                            for segments in (False, True)]
CASES += [(65, 64, False), (65, 64, True)]
PARALLEL_CASES = [(1, False), (7, False), (7, True), (65, False), (65, True)]
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _inputs(seed, *, time, segments, input_scale=2.0, input_bias=0.0, forget_bias=2.0):
  """(q, k, v, input_gate, forget_gate, initial state, segment_ids, cotangent).

  NumPy arrays: slicing and casting them compiles nothing.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  q, k = normal(BATCH, time, HEADS, DK), normal(BATCH, time, HEADS, DK)
  v = normal(BATCH, time, HEADS, DV)
  input_gate = input_scale * normal(BATCH, time, HEADS) + np.float32(input_bias)
  forget_gate = normal(BATCH, time, HEADS) + np.float32(forget_bias)
  state = (normal(BATCH, HEADS, DK, DV), normal(BATCH, HEADS, DK), normal(BATCH, HEADS))
  segment_ids = None
  if segments:
    segment_ids = np.cumsum(rng.random((BATCH, time)) < 0.06, axis=1, dtype=np.int32)
  cotangent = normal(BATCH, time, HEADS, DV)
  return q, k, v, input_gate, forget_gate, state, segment_ids, cotangent


def _zero_state():
  return (np.zeros((BATCH, HEADS, DK, DV), np.float32), np.zeros((BATCH, HEADS, DK), np.float32),
          np.zeros((BATCH, HEADS), np.float32))


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"),
                   compiler_options=_FAST_COMPILE)
def _jitted_outputs_and_grads(q, k, v, input_gate, forget_gate, state, segment_ids, cotangent, *,
                              impl, chunk_size):
  def run(q, k, v, input_gate, forget_gate, state):
    return ops.mlstm(q, k, v, input_gate, forget_gate, initial_state=state,
                     segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)

  (h, final), vjp = jax.vjp(run, q, k, v, input_gate, forget_gate, state)
  grads = vjp((cotangent.astype(h.dtype), jax.tree.map(jnp.cos, final)))
  return h, final, grads


def _outputs_and_grads(*args, impl, chunk_size=16):
  """(h, final state, d/d(q, k, v, input_gate, forget_gate, initial state)).

  Always passes chunk_size: jit caches a defaulted and an explicit keyword
  separately."""
  return _jitted_outputs_and_grads(*args, impl=impl, chunk_size=chunk_size)


def _oracle(args):
  return _outputs_and_grads(*args, impl="recurrent")


def _check_against_oracle(args, impl, chunk_size, tol):
  ref = _oracle(args)
  got = _outputs_and_grads(*args, impl=impl, chunk_size=chunk_size)
  assert_close(got[0], ref[0], tol, "output")
  assert_close(got[1], ref[1], tol, "final state (C, n, m)")
  for name, g, g_ref in zip(("q", "k", "v", "input_gate", "forget_gate", "initial state"),
                            got[2], ref[2]):
    assert_close(g, g_ref, tol, f"gradient wrt {name}")


@pytest.mark.parametrize("time, chunk_size, segments", CASES)
def test_chunked_matches_recurrent(time, chunk_size, segments):
  args = _inputs(time, time=time, segments=segments)
  _check_against_oracle(args, "chunked", chunk_size, F32_TOL)


@pytest.mark.parametrize("time, segments", PARALLEL_CASES)
def test_parallel_matches_recurrent(time, segments):
  args = _inputs(time, time=time, segments=segments)
  _check_against_oracle(args, "parallel", 16, F32_TOL)


@pytest.mark.parametrize("impl", ["chunked", "parallel"])
def test_extreme_gates_neither_overflow_nor_drift(impl):
  # exp(100) overflows float32, and a chunk of 64 forgets by e^−2560: a form
  # that exponentiated an unstabilised gate or divided by a cumulated
  # forget gate would return inf or nan.
  args = _inputs(12, time=65, segments=True, input_scale=20.0, input_bias=100.0,
                 forget_bias=-40.0)
  assert args[3].max() > 100 and args[4].min() < -40  # logσ(f̃) ≈ f̃ there
  _check_against_oracle(args, impl, 16, EXTREME_GATES_TOL)


def test_bfloat16_inputs_match_float32_oracle():
  q, k, v, i, f, state, seg, ct = _inputs(5, time=65, segments=True)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  rounded = lambda x: bf16(x).astype(jnp.float32)
  ref = _oracle((rounded(q), rounded(k), rounded(v), rounded(i), rounded(f), state, seg, ct))
  got = _outputs_and_grads(bf16(q), bf16(k), bf16(v), bf16(i), bf16(f), state, seg, ct,
                           impl="chunked", chunk_size=64)
  assert got[0].dtype == jnp.bfloat16
  assert all(s.dtype == jnp.float32 for s in got[1])  # the state accumulates in float32
  assert_close(got[0], ref[0], BF16_TOL, "output")
  assert_close(got[1], ref[1], BF16_TOL, "final state")
  assert_close(got[2], ref[2], BF16_TOL, "gradients")


def _numpy_oracle(q, k, v, input_gate, forget_gate, state, segment_ids):
  """The equations of the module docstring, in float64 loops; a new
  document restarts from (C, n, m) = (0, 0, 0)."""
  q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, input_gate, forget_gate))
  batch, time, heads, dk = q.shape
  h = np.zeros(v.shape)
  finals = []
  for b in range(batch):
    c, n, m = (np.array(s[b], np.float64) for s in state)
    for t in range(time):
      if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
        c, n, m = np.zeros_like(c), np.zeros_like(n), np.zeros_like(m)
      for head in range(heads):
        log_f = -np.log1p(np.exp(-f[b, t, head]))
        m_new = max(log_f + m[head], i[b, t, head])
        f_gate = np.exp(log_f + m[head] - m_new)
        i_gate = np.exp(i[b, t, head] - m_new)
        key = k[b, t, head] / np.sqrt(dk)
        c[head] = f_gate * c[head] + i_gate * np.outer(key, v[b, t, head])
        n[head] = f_gate * n[head] + i_gate * key
        m[head] = m_new
        qn = q[b, t, head] @ n[head]
        h[b, t, head] = q[b, t, head] @ c[head] / (max(abs(qn), np.exp(-m_new)) + 1e-6)
    finals.append((c, n, m))
  return h, tuple(np.stack(s) for s in zip(*finals))


def test_recurrent_oracle_matches_the_equations():
  q, k, v, i, f, state, seg, ct = _inputs(6, time=65, segments=True)
  assert seg[:, -1].min() >= 2  # several resets in every row
  h, final, _ = _oracle((q, k, v, i, f, state, seg, ct))
  ref_h, ref_final = _numpy_oracle(q, k, v, i, f, state, seg)
  assert_close(h, ref_h, ORACLE_TOL, "output")
  assert_close(final, ref_final, ORACLE_TOL, "final state (C, n, m)")


def test_no_initial_state_is_the_zero_state():
  q, k, v, i, f, _, _, _ = _inputs(7, time=7, segments=False)
  run = jax.jit(ops.mlstm, static_argnames="impl", compiler_options=_FAST_COMPILE)
  h, final = run(q, k, v, i, f, impl="recurrent")
  h_zero, final_zero = run(q, k, v, i, f, initial_state=_zero_state(), impl="recurrent")
  assert_close(h, h_zero, 1e-6, "output")
  assert_close(final, final_zero, 1e-6, "final state")


@pytest.mark.parametrize("impl", ["recurrent", "chunked", "parallel"])
def test_state_passing_whole_equals_pieces_equals_tokens(impl):
  q, k, v, i, f, state0, _, ct = _inputs(8, time=65, segments=False)

  def run(lo, hi, state):
    piece = lambda x: x[:, lo:hi]
    h, state, _ = _outputs_and_grads(piece(q), piece(k), piece(v), piece(i), piece(f), state,
                                     None, piece(ct), impl=impl)
    return np.asarray(h), state

  whole_h, whole_state = run(0, 65, state0)
  for lengths in ([7, 1, 7, 7, 7, 1, 7, 7, 7, 7, 7], [1] * 65):
    cuts = np.cumsum([0] + lengths)
    state, pieces = state0, []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      h, state = run(lo, hi, state)
      pieces.append(h)
    what = f"pieces of {sorted(set(lengths))}"
    assert_close(np.concatenate(pieces, 1), whole_h, F32_TOL, f"{what}: output")
    assert_close(state, whole_state, F32_TOL, f"{what}: final state")


_MANY_SHORT, _ONE_LONG = [7, 1, 7, 7, 7, 1, 7, 7, 7, 7, 7], [1, 63, 1]


@pytest.mark.parametrize("lengths", [_MANY_SHORT, _ONE_LONG])
@pytest.mark.parametrize("impl", ["recurrent", "chunked", "parallel"])
def test_packed_row_equals_documents_run_separately(impl, lengths):
  """Each document of a packed row gives the outputs it gives alone from a
  zero state (the first one: from the initial state); the last one also its
  final state and gradients. A one-token last document makes the final
  stabiliser ``max(logσ(f̃) + 0, ĩ)``: the reset value of m shows there."""
  q, k, v, i, f, state0, _, ct = _inputs(9, time=65, segments=False)
  cuts = np.cumsum([0] + lengths)
  segment_ids = np.repeat(np.arange(len(lengths), dtype=np.int32) * 3 + 1, lengths)
  h, final, grads = _outputs_and_grads(q, k, v, i, f, state0, np.stack([segment_ids] * BATCH), ct,
                                       impl=impl)
  for n, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
    piece = lambda x: np.asarray(x)[:, lo:hi]
    alone_h, alone_final, alone_grads = _outputs_and_grads(
        piece(q), piece(k), piece(v), piece(i), piece(f), state0 if n == 0 else _zero_state(),
        None, piece(ct), impl=impl)
    assert_close(piece(h), alone_h, F32_TOL, f"document [{lo}, {hi}): output")
  # The last document's final state is the only one with a cotangent in both runs.
  assert_close(final, alone_final, F32_TOL, "final state = the last document's")
  assert_close([piece(g) for g in grads[:5]], alone_grads[:5], F32_TOL,
               "last document: gradients wrt q, k, v and the gates")


def test_auto_picks_chunked_on_cpu():
  for time in (1, 64, 2048):
    assert mlstm_module.REGISTRY.resolve(
        "auto", time=time, dtype=jnp.float32, chunk_size=64).name == "chunked"


def _largest_intermediate(jaxpr):
  """Elements of the largest array anywhere in ``jaxpr``, sub-jaxprs included."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          largest = max(largest, _largest_intermediate(sub))
  return largest


def test_chunked_memory_grows_linearly_in_length():
  """No O(T²) array anywhere in the chunked forward and backward (traced, not compiled)."""

  def largest(time):
    q, k, v, i, f, _, _, ct = _inputs(10, time=time, segments=False)
    seg = np.zeros((BATCH, time), np.int32)
    loss = lambda *args: jnp.sum(ops.mlstm(*args, segment_ids=seg, impl="chunked")[0] * ct)
    return _largest_intermediate(
        jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, i, f).jaxpr)

  small, large = largest(1024), largest(4096)
  assert large / small < 4.5, (small, large)  # quadratic would give 16


def _ones(*shape, dtype=np.float32):
  return np.ones(shape, dtype)


_STATE = (_ones(2, 3, 8, 6), _ones(2, 3, 8), _ones(2, 3))


@pytest.mark.parametrize("bad, message", [
    (dict(q=_ones(2, 5, 3, 8, dtype=np.int32)), r"q has dtype int32; expected a floating"),
    (dict(q=_ones(2, 5, 8)), r"q has shape \[2, 5, 8\]; expected \[B, T, H, K\]"),
    (dict(k=_ones(2, 5, 3, 7)), r"k has shape \[2, 5, 3, 7\]; expected \[2, 5, 3, 8\]"),
    (dict(v=_ones(2, 5, 2, 6)), r"v has shape \[2, 5, 2, 6\]; expected \[B, T, H, V\]"),
    (dict(input_gate=_ones(2, 5, 3, 1)),
     r"input_gate has shape \[2, 5, 3, 1\]; expected \[2, 5, 3\]"),
    (dict(forget_gate=_ones(2, 4, 3)), r"forget_gate has shape \[2, 4, 3\]; expected \[2, 5, 3\]"),
    (dict(forget_gate=_ones(2, 5, 3, dtype=np.int32)),
     r"forget_gate has dtype int32; expected a floating"),
    (dict(initial_state=_STATE[0]), r"initial_state must be the triple \(C, n, m\); got ndarray$"),
    (dict(initial_state=_STATE[:2]),
     r"initial_state must be the triple \(C, n, m\); got tuple of length 2"),
    (dict(initial_state=(_ones(2, 3, 6, 8),) + _STATE[1:]),
     r"initial_state C has shape \[2, 3, 6, 8\]; expected \[2, 3, 8, 6\]"),
    (dict(initial_state=(_STATE[0], _ones(2, 3, 6), _STATE[2])),
     r"initial_state n has shape \[2, 3, 6\]; expected \[2, 3, 8\]"),
    (dict(initial_state=_STATE[:2] + (_ones(2, 3, 1),)),
     r"initial_state m has shape \[2, 3, 1\]; expected \[2, 3\]"),
    (dict(segment_ids=_ones(2, 4, dtype=np.int32)), r"segment_ids has shape \[2, 4\]"),
    (dict(segment_ids=_ones(2, 5)), r"segment_ids has dtype float32; expected an integer"),
    (dict(chunk_size=0), r"chunk_size=0; expected a positive int"),
    (dict(impl="fast"), r"impl='fast' is not one of"),
])
def test_bad_arguments_raise_one_clear_line(bad, message):
  args = dict(q=_ones(2, 5, 3, 8), k=_ones(2, 5, 3, 8), v=_ones(2, 5, 3, 6),
              input_gate=_ones(2, 5, 3), forget_gate=_ones(2, 5, 3))
  args.update(bad)
  with pytest.raises((ValueError, TypeError), match=message):
    ops.mlstm(**args)
