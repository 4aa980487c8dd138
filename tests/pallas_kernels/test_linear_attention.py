"""Specification of pallas_kernels.linear_attention: the kernels equal the ops oracle.

The kernels run in interpret mode on CPU, with the block shapes and grid of
each backend ("gpu": one program per head and value block looping over
chunks; "tpu": a sequential grid over chunks with the state in scratch),
against the token-by-token oracle ``recurrent_lm.ops.linear_attention._recurrent``:
the output, the final state and the gradients with respect to q, k, v, the
log-decays and the initial state (``jax.vjp`` with a random cotangent on both
outputs).

Tolerances: errors are max|x − ref| / max|ref| per array. float32 inputs
within F32_TOL (measured: below 1e-6); bfloat16 q, k, v within BF16_TOL of
the float32 oracle run on the same rounded inputs (measured: below 6e-3; the
kernels multiply in bfloat16, the state included).

Every kernel output starts as NaN (``poison_outputs=True``), so an element
the kernels fail to write fails the check.
"""

import functools
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels.linear_attention as la_kernels
from pallas_kernels.linear_attention import kernel as kernel_module
from tests.ops._close import assert_close
from tests.pallas_kernels._util import FAST_COMPILE

la_op = importlib.import_module("recurrent_lm.ops.linear_attention")

F32_TOL = 1e-4
BF16_TOL = 2e-2
# Decays of e^−40 per token: the exponents are differences of cumulated
# log-decays near −1000, whose float32 rounding (ulp ≈ 1e-4) is a relative
# error of the tiny log-decay gradients (measured: below 5e-5).
EXTREME_DECAY_TOL = 1e-3
BATCH, HEADS, DK, DV = 2, 2, 8, 6
_NAMES = ("o", "S_final", "d_q", "d_k", "d_v", "d_log_decay", "d_s0")

# (backend, decay, time, chunk_size, segments, value_dim). Chunk 16: T = 1
# and 7 in one padded chunk, T = 33 ends with a chunk of one token. Chunk 32
# at T = 65: three chunks of two vector-decay sub-chunks each, the last of one
# token. V = 65 (gpu) and 129 (tpu) span two value blocks, so dq, dk and the
# log-decay gradient are sums over blocks. (tpu, vector, 33, 16, segments)
# runs in the TPU interpreter below.
CASES = [("gpu", "none", 1, 16, False, DV), ("gpu", "none", 65, 32, True, DV),
         ("gpu", "scalar", 33, 16, True, DV), ("gpu", "scalar", 65, 32, False, 65),
         ("gpu", "vector", 7, 32, False, DV), ("gpu", "vector", 33, 16, True, DV),
         ("gpu", "vector", 65, 32, True, 65),
         ("tpu", "none", 7, 16, False, DV), ("tpu", "scalar", 65, 32, True, 129),
         ("tpu", "vector", 65, 32, False, DV)]


def _inputs(seed, *, time, decay, segments, dv=DV, decay_bias=2.0):
  """``(q, k, v, g, s0, doc)`` as the op passes them, and a cotangent for
  ``(o, S_final)``."""
  keys = jax.random.split(jax.random.key(seed), 8)
  q = jax.random.normal(keys[0], (BATCH, time, HEADS, DK)) * DK ** -0.5
  k = jax.random.normal(keys[1], (BATCH, time, HEADS, DK))
  v = jax.random.normal(keys[2], (BATCH, time, HEADS, dv))
  if decay == "none":  # what the op passes without a decay
    g = jnp.zeros((BATCH, time, HEADS, 1))
  else:
    width = 1 if decay == "scalar" else DK
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (BATCH, time, HEADS, width)) + decay_bias)
  s0 = jax.random.normal(keys[4], (BATCH, HEADS, DK, dv))
  doc = None
  if segments:
    starts = jax.random.bernoulli(keys[5], 0.1, (BATCH, time)).at[:, 0].set(False)
    # Documents that start at a chunk (or sub-chunk) boundary.
    starts = starts.at[0, min(16, time - 1)].set(True).at[1, min(32, time - 1)].set(True)
    starts = starts.at[1, min(5, time - 1):min(7, time)].set(True)  # a document of one token
    doc = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
  cotangents = (jax.random.normal(keys[6], (BATCH, time, HEADS, dv)),
                jax.random.normal(keys[7], (BATCH, HEADS, DK, dv)))
  return (q, k, v, g, s0, doc), cotangents


def _outputs_and_grads(fn, args, cotangents):
  *arrays, doc = args
  outputs, vjp = jax.vjp(lambda *a: fn(*a, doc), *arrays)
  return (*outputs, *vjp(cotangents))


_oracle = jax.jit(functools.partial(
    _outputs_and_grads, functools.partial(la_op._recurrent, causal=True, chunk_size=1)),
    compiler_options=FAST_COMPILE)


def _kernel(args, cotangents, *, backend, chunk_size, interpret=True):
  fn = functools.partial(la_kernels.linear_attention_kernel, chunk_size=chunk_size,
                         backend=backend, interpret=interpret, poison_outputs=True)
  return jax.jit(functools.partial(_outputs_and_grads, fn),
                 compiler_options=FAST_COMPILE)(args, cotangents)


def _assert_matches(got, ref, tol):
  for name, x, x_ref in zip(_NAMES, got, ref):
    assert_close(x, x_ref, tol, name)


@pytest.mark.parametrize("backend, decay, time, chunk_size, segments, value_dim", CASES)
def test_float32_matches_recurrent_oracle(backend, decay, time, chunk_size, segments, value_dim):
  args, cotangents = _inputs(time, time=time, decay=decay, segments=segments, dv=value_dim)
  if segments and time > 16:
    assert (np.diff(args[-1], axis=1) > 0).sum() >= 4  # several documents per batch
  got = _kernel(args, cotangents, backend=backend, chunk_size=chunk_size)
  assert got[0].dtype == got[1].dtype == jnp.float32
  _assert_matches(got, _oracle(args, cotangents), F32_TOL)


def test_wide_values_span_two_value_blocks():
  for backend, value_dim in (("gpu", 65), ("tpu", 129)):
    _, _, block_v, value = kernel_module._block_shapes(backend, time=65, key_dim=DK,
                                                       value_dim=value_dim, chunk_size=32)
    assert value // block_v == 2


def test_tpu_interpreter_matches_recurrent_oracle():
  # The TPU interpreter models VMEM scratch (initialised to NaN) and the
  # write-back of output blocks that stay resident across the chunk axis.
  args, cotangents = _inputs(3, time=33, decay="vector", segments=True)
  got = _kernel(args, cotangents, backend="tpu", chunk_size=16,
                interpret=pltpu.InterpretParams())
  _assert_matches(got, _oracle(args, cotangents), F32_TOL)


@pytest.mark.parametrize("backend, decay, time, chunk_size",
                         [("gpu", "vector", 65, 32), ("tpu", "scalar", 33, 16)])
def test_bfloat16_inputs_match_float32_oracle(backend, decay, time, chunk_size):
  args, cotangents = _inputs(100 + time, time=time, decay=decay, segments=True)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  rounded = tuple(bf16(x).astype(jnp.float32) for x in args[:3]) + args[3:]
  got = _kernel((*map(bf16, args[:3]), *args[3:]), cotangents, backend=backend,
                chunk_size=chunk_size)
  assert [g.dtype for g in got[2:5]] == [jnp.bfloat16] * 3  # gradients in the inputs' dtype
  assert got[0].dtype == got[1].dtype == jnp.float32  # the state accumulates in float32
  _assert_matches(got, _oracle(rounded, cotangents), BF16_TOL)


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_extreme_decays_neither_overflow_nor_cancel(decay):
  # Log-decays near −40 per token: a sub-chunk decays by e^−640, so any
  # factor e^{−b} (the naive (q ⊙ e^b)(k ⊙ e^−b)ᵀ split) would be inf; and
  # the log-decay gradients (~1e-16) must not drown in the rounding of the
  # O(1) terms that carry no decay (the pairs j = i).
  args, cotangents = _inputs(7, time=65, decay=decay, segments=True, decay_bias=-40.0)
  assert float(jnp.max(args[3])) < -30
  got = _kernel(args, cotangents, backend="gpu", chunk_size=32)
  _assert_matches(got, _oracle(args, cotangents), EXTREME_DECAY_TOL)


def test_poisoned_outputs_expose_an_unwritten_chunk(monkeypatch):
  store = kernel_module._store

  def store_but_first_chunk(ref, index, value):
    pl.when(index[0] != 0)(lambda: store(ref, index, value))

  monkeypatch.setattr(kernel_module, "_store", store_but_first_chunk)
  args, cotangents = _inputs(3, time=33, decay="scalar", segments=False)
  o, _, _, _, d_v, _, _ = _kernel(args, cotangents, backend="gpu", chunk_size=16)
  assert np.isnan(o[:, :16]).all() and np.isnan(d_v[:, :16]).all()
  assert np.isfinite(o[:, 16:]).all()


def test_registry_entry_has_the_private_signature_and_runs_on_cpu():
  assert inspect.signature(la_kernels.linear_attention) == inspect.signature(
      la_op._chunked_causal)
  args, _ = _inputs(11, time=7, decay="vector", segments=True)
  got = jax.jit(functools.partial(la_kernels.linear_attention, chunk_size=16))(*args)
  ref = la_op._recurrent(*args, causal=True, chunk_size=16)
  for name, x, x_ref in zip(_NAMES, got, ref):
    assert_close(x, x_ref, F32_TOL, name)


@pytest.mark.parametrize("backend, platform, target", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("decay, dtype", [("scalar", jnp.float32), ("vector", jnp.bfloat16)])
def test_forward_and_backward_lower_for_the_backend(backend, platform, target, decay, dtype):
  # Builds the Triton IR / Mosaic module on CPU: block shapes (Triton:
  # powers of two) and every primitive have a lowering. Compiling them
  # needs the hardware. T = 150 in three chunks, V = 65 in two value blocks
  # on gpu.
  batch, time, heads, dk, dv = 2, 150, 4, 64, 65
  spec = jax.ShapeDtypeStruct
  fn = functools.partial(la_kernels.linear_attention_kernel, chunk_size=64, backend=backend)

  def forward_and_backward(q, k, v, g, s0, doc):
    outputs, vjp = jax.vjp(lambda *a: fn(*a, doc), q, k, v, g, s0)
    return vjp(outputs)

  lowered = jax.jit(forward_and_backward).trace(
      spec((batch, time, heads, dk), dtype), spec((batch, time, heads, dk), dtype),
      spec((batch, time, heads, dv), dtype),
      spec((batch, time, heads, dk if decay == "vector" else 1), jnp.float32),
      spec((batch, heads, dk, dv), jnp.float32), spec((batch, time), jnp.int32),
  ).lower(lowering_platforms=(platform,))
  assert lowered.as_text().count(f"@{target}(") == 2  # the forward and the backward kernel


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_supports_gpu_and_tpu_never_cpu(decay, dtype):
  call = dict(decay=decay, causal=True, normalize=False, dtype=dtype, chunk_size=64)
  for time in (1, 7, 2048):
    assert not la_kernels.supports(backend="cpu", time=time, **call)
    for backend in ("gpu", "tpu"):
      assert la_kernels.supports(backend=backend, time=time, **call)
      assert la_kernels.supports(backend=backend, time=time, **{**call, "normalize": True})


def test_supports_rejects_what_it_does_not_handle():
  supports = la_kernels.supports
  call = dict(time=64, decay="scalar", causal=True, normalize=False, dtype=jnp.float32)
  for backend in ("gpu", "tpu"):
    assert not supports(backend=backend, chunk_size=64, **{**call, "causal": False})
    assert not supports(backend=backend, chunk_size=64, **{**call, "dtype": jnp.float16})
    assert not supports(backend=backend, chunk_size=64, **{**call, "decay": "matrix"})
    assert not supports(backend=backend, chunk_size=64, **{**call, "time": 0})
  for chunk_size in (8, 48, 256):  # Triton: powers of two, 16 to 128
    assert not supports(backend="gpu", chunk_size=chunk_size, **call)
  for chunk_size in (8, 24, 512):  # Mosaic: multiples of 16, up to 256
    assert not supports(backend="tpu", chunk_size=chunk_size, **call)
  assert supports(backend="tpu", chunk_size=48, **call)
  assert supports(backend="gpu", chunk_size=64, key_dim=256, **call)
  assert not supports(backend="gpu", chunk_size=64, key_dim=257, **call)


def test_unsupported_calls_raise():
  args, _ = _inputs(0, time=7, decay="scalar", segments=False)
  with pytest.raises(ValueError, match="chunk_size=48"):
    la_kernels.linear_attention_kernel(*args, chunk_size=48, backend="gpu", interpret=True)
  q, k, v, g, s0, doc = args
  with pytest.raises(ValueError, match="g has 3 channels"):
    la_kernels.linear_attention_kernel(q, k, v, jnp.zeros((*g.shape[:3], 3)), s0, doc,
                                       chunk_size=16, backend="gpu", interpret=True)
