"""Specification of pallas_kernels.mlstm: the kernels equal the ops.mlstm oracle.

The kernels run in interpret mode on CPU, with the block shapes and grid of
each backend ("gpu": one program per head looping over chunks; "tpu": a
sequential grid over chunks with the state in scratch), against the
token-by-token oracle ``recurrent_lm.ops.mlstm._recurrent``: outputs ``qs``
and ``m``, the final state and the gradients with respect to every input
(``jax.vjp`` with a random cotangent on every output).

Tolerances: errors are max|x − ref| / max|ref| per array. float32 inputs
within F32_TOL (measured: below 1e-6); bfloat16 q, k, v within BF16_TOL of
the float32 oracle run on the same rounded inputs (measured: below 7e-3;
the kernels multiply in bfloat16).

Every float32 case runs with ``poison_outputs=True``: each kernel output
starts as NaN, so an element the kernels fail to write fails the check.

Compile time dominates: shapes are tiny and each case compiles once, without
LLVM's expensive optimisations.
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

import pallas_kernels.mlstm as mlstm_kernels
from pallas_kernels.mlstm import kernel as kernel_module
from tests.ops._close import assert_close
from tests.pallas_kernels._util import FAST_COMPILE, assert_outputs_and_grads_match

mlstm_op = importlib.import_module("recurrent_lm.ops.mlstm")

F32_TOL = 1e-4
BF16_TOL = 2e-2
BATCH, HEADS, DK, DV = 2, 2, 8, 6  # v carries DV + 1 columns, the last ones
_OUTPUTS = ("qs", "m", "S_final", "m_final")
_INPUTS = ("q", "k", "v", "log_f", "i", "s0", "m0")

# (backend, time, chunk_size, segments). GPU chunk 16: T = 1 and 7 in one
# padded chunk, T = 33 ends with a chunk of one token; chunk 64 at T = 65 the
# same with a long chunk. TPU chunk 32 at T = 65: three chunks.
CASES = [("gpu", 1, 16, False), ("gpu", 7, 16, True), ("gpu", 33, 16, True),
         ("gpu", 65, 32, True), ("gpu", 65, 64, False),
         ("tpu", 7, 16, False), ("tpu", 33, 16, True), ("tpu", 65, 32, True)]


def _inputs(seed, *, time, segments, input_scale=2.0, input_bias=0.0, forget_bias=2.0):
  """NumPy ``(q, k, v, log_f, i, s0, m0, doc)`` as the op passes them, and a
  cotangent for each output."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k = normal(BATCH, time, HEADS, DK), normal(BATCH, time, HEADS, DK) / np.sqrt(DK)
  v = np.concatenate([normal(BATCH, time, HEADS, DV), np.ones((BATCH, time, HEADS, 1), np.float32)],
                     axis=-1)
  log_f = np.asarray(jax.nn.log_sigmoid(normal(BATCH, time, HEADS) + forget_bias))
  i = input_scale * normal(BATCH, time, HEADS) + np.float32(input_bias)
  s0, m0 = normal(BATCH, HEADS, DK, DV + 1), normal(BATCH, HEADS)
  doc = None
  if segments:
    starts = rng.random((BATCH, time)) < 0.1
    starts[:, 0] = False
    starts[0, min(16, time - 1)] = True  # a document that starts at a chunk boundary
    starts[1, min(5, time - 1):min(7, time)] = True  # a document of one token
    doc = np.cumsum(starts, axis=1, dtype=np.int32)
  cotangents = (normal(BATCH, time, HEADS, DV + 1), normal(BATCH, time, HEADS),
                normal(BATCH, HEADS, DK, DV + 1), normal(BATCH, HEADS))
  return (q, k, v, log_f, i, s0, m0, doc), cotangents


def _outputs_and_grads(fn, args, cotangents):
  *arrays, doc = args
  outputs, vjp = jax.vjp(lambda *a: fn(*a, doc), *arrays)
  return outputs, vjp(tuple(c.astype(o.dtype) for c, o in zip(cotangents, outputs)))


# The token-by-token oracle with its gradients; compiled once per input shape.
_oracle = jax.jit(functools.partial(_outputs_and_grads,
                                    functools.partial(mlstm_op._recurrent, chunk_size=1)),
                  compiler_options=FAST_COMPILE)


def _kernel(args, cotangents, *, backend, chunk_size, interpret=True, poison=True):
  fn = functools.partial(mlstm_kernels.mlstm_kernel, chunk_size=chunk_size, backend=backend,
                         interpret=interpret, poison_outputs=poison)
  return jax.jit(functools.partial(_outputs_and_grads, fn),
                 compiler_options=FAST_COMPILE)(args, cotangents)


def _assert_matches(got, ref, tol):
  assert_outputs_and_grads_match(got, ref, tol, _OUTPUTS, _INPUTS)


@pytest.mark.parametrize("backend, time, chunk_size, segments", CASES)
def test_float32_matches_recurrent_oracle(backend, time, chunk_size, segments):
  args, cotangents = _inputs(time, time=time, segments=segments)
  if segments and time > 16:
    assert (np.diff(args[-1], axis=1) > 0).sum() >= 4  # several documents per batch
  got = _kernel(args, cotangents, backend=backend, chunk_size=chunk_size)
  _assert_matches(got, _oracle(args, cotangents), F32_TOL)


def test_tpu_interpreter_matches_recurrent_oracle():
  # The TPU interpreter models VMEM scratch (initialised to NaN) and the
  # write-back of output blocks that stay resident across the chunk axis.
  args, cotangents = _inputs(33, time=33, segments=True)
  got = _kernel(args, cotangents, backend="tpu", chunk_size=16,
                interpret=pltpu.InterpretParams())
  _assert_matches(got, _oracle(args, cotangents), F32_TOL)


@pytest.mark.parametrize("backend, time, chunk_size", [("gpu", 65, 32), ("tpu", 33, 16)])
def test_bfloat16_inputs_match_float32_oracle(backend, time, chunk_size):
  args, cotangents = _inputs(100 + time, time=time, segments=True)
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  rounded = tuple(np.asarray(bf16(x), np.float32) for x in args[:3]) + args[3:]
  got = _kernel((*map(bf16, args[:3]), *args[3:]), cotangents, backend=backend,
                chunk_size=chunk_size, poison=False)
  assert [g.dtype for g in got[1][:3]] == [jnp.bfloat16] * 3  # gradients in the inputs' dtype
  _assert_matches(got, _oracle(rounded, cotangents), BF16_TOL)


def test_extreme_gates_neither_overflow_nor_drift():
  # ĩ near +100 overflows exp in float32 and a chunk forgets by e^−640: a
  # kernel that exponentiated an unstabilised gate would return inf or nan.
  args, cotangents = _inputs(7, time=65, segments=True, input_scale=20.0, input_bias=100.0,
                             forget_bias=-40.0)
  got = _kernel(args, cotangents, backend="gpu", chunk_size=16)
  _assert_matches(got, _oracle(args, cotangents), F32_TOL)


def test_poisoned_outputs_expose_an_unwritten_chunk(monkeypatch):
  load_store = kernel_module._chunk_access

  def skip_first_chunk(plan):
    load, store = load_store(plan)
    def store_but_first(ref, n, value):
      pl.when(n != 0)(lambda: store(ref, n, value))
    return load, store_but_first

  monkeypatch.setattr(kernel_module, "_chunk_access", skip_first_chunk)
  args, _ = _inputs(3, time=33, segments=False)
  qs, m, _, _ = jax.jit(functools.partial(
      mlstm_kernels.mlstm_kernel, chunk_size=16, backend="gpu", interpret=True,
      poison_outputs=True))(*args)
  assert np.isnan(qs[:, :16]).all() and np.isnan(m[:, :16]).all()
  assert np.isfinite(qs[:, 16:]).all() and np.isfinite(m[:, 16:]).all()


def test_registry_entry_has_the_private_signature_and_runs_on_cpu():
  assert inspect.signature(mlstm_kernels.mlstm) == inspect.signature(mlstm_op._recurrent)
  args, _ = _inputs(11, time=7, segments=True)
  got = jax.jit(functools.partial(mlstm_kernels.mlstm, chunk_size=16))(*args)
  ref = mlstm_op._recurrent(*args, chunk_size=16)
  for name, x, x_ref in zip(_OUTPUTS, got, ref):
    assert_close(x, x_ref, F32_TOL, name)


@pytest.mark.parametrize("backend, platform, target", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_lower_for_the_backend(backend, platform, target, dtype):
  # Builds the Triton IR / Mosaic module on CPU: block shapes and every
  # primitive have a lowering. Compiling them needs the hardware.
  batch, time, heads, dk, dv = 2, 200, 4, 64, 65
  spec = jax.ShapeDtypeStruct
  gates = spec((batch, time, heads), jnp.float32)
  state = (spec((batch, heads, dk, dv), jnp.float32), spec((batch, heads), jnp.float32))
  fn = functools.partial(mlstm_kernels.mlstm_kernel, chunk_size=64, backend=backend)
  def forward_and_backward(q, k, v, log_f, i, s0, m0, doc):
    outputs, vjp = jax.vjp(lambda *a: fn(*a, doc), q, k, v, log_f, i, s0, m0)
    return vjp(outputs)
  lowered = jax.jit(forward_and_backward).trace(
      spec((batch, time, heads, dk), dtype), spec((batch, time, heads, dk), dtype),
      spec((batch, time, heads, dv), dtype), gates, gates, *state,
      spec((batch, time), jnp.int32)).lower(lowering_platforms=(platform,))
  assert lowered.as_text().count(f"@{target}(") == 2  # the forward and the backward kernel


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_supports_gpu_and_tpu_never_cpu(dtype):
  for time in (1, 7, 2048):
    assert not mlstm_kernels.supports(backend="cpu", time=time, dtype=dtype, chunk_size=64)
    for backend in ("gpu", "tpu"):
      assert mlstm_kernels.supports(backend=backend, time=time, dtype=dtype, chunk_size=64)


def test_supports_rejects_what_does_not_lower():
  supports = mlstm_kernels.supports
  assert not supports(backend="gpu", time=64, dtype=jnp.float16, chunk_size=64)
  assert not supports(backend="tpu", time=64, dtype=jnp.float64, chunk_size=64)
  for chunk_size in (8, 48, 256):  # Triton: powers of two, 16 to 128
    assert not supports(backend="gpu", time=64, dtype=jnp.float32, chunk_size=chunk_size)
  for chunk_size in (8, 24, 512):  # Mosaic: multiples of 16, up to 256
    assert not supports(backend="tpu", time=64, dtype=jnp.float32, chunk_size=chunk_size)
  assert supports(backend="tpu", time=64, dtype=jnp.float32, chunk_size=48)
  # Triton keeps the padded state [K, V+1] in registers: V = 128 pads to 256.
  assert supports(backend="gpu", dtype=jnp.float32, chunk_size=64, key_dim=64, value_dim=64)
  assert not supports(backend="gpu", dtype=jnp.float32, chunk_size=64, key_dim=128,
                      value_dim=128)


def test_unsupported_chunk_size_raises():
  args, _ = _inputs(0, time=7, segments=False)
  with pytest.raises(ValueError, match="chunk_size=48"):
    mlstm_kernels.mlstm_kernel(*args, chunk_size=48, backend="gpu", interpret=True)
