"""Specification of pallas_kernels.linear_scan: the kernels equal the ops.linear_scan oracle.

The kernels run in interpret mode on CPU with the block shapes and grid of
each backend ("gpu": one program per feature block looping over time rows,
several rows per loop step; "tpu": a sequential grid over time blocks with
the state in scratch, each block scanned a sublane group at a time) against
the token-by-token oracle ``recurrent_lm.ops.linear_scan._recurrent``:
``h``, ``h_last`` and the gradients with respect to ``a``, ``b`` and ``h0``
(``jax.vjp`` with a random cotangent on both outputs).

Tolerances: errors are max|x − ref| / max|ref| per array. float32 inputs
within F32_TOL (measured: below 2e-7); bfloat16 ``a, b`` within BF16_TOL of
the float32 oracle run on the same rounded inputs (measured: below 4e-3, the
gradients ``da, db`` are rounded to bfloat16; the state is float32).

The oracle comparisons run with ``poison_outputs=True``: each kernel output
starts as NaN, so an element the kernels fail to write fails the check (two
tests show that it does).
"""

import dataclasses
import functools
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels.linear_scan as scan_kernels
from pallas_kernels.linear_scan import kernel as kernel_module
from recurrent_lm import ops
from tests.ops._close import assert_close
from tests.pallas_kernels._util import FAST_COMPILE, assert_outputs_and_grads_match

scan_op = importlib.import_module("recurrent_lm.ops.linear_scan")

F32_TOL = 1e-5
BF16_TOL = 1e-2
BATCH = 2
_OUTPUTS = ("h", "h_last")
_INPUTS = ("a", "b", "h0")

# (backend, time, chunk_size, segments, trailing shape). gpu: chunk_size rows
# per loop step (4: T = 7, 33, 65 leave 3, 1, 1 rows to the single-row loop;
# 16); D = 160 is two feature blocks of 128, the second padded. tpu:
# chunk_size rows per grid step (8: one sublane group; 16, 32: several);
# D = 640 is five feature blocks of 128.
CASES = [("gpu", 1, 4, False, (3, 5)), ("gpu", 7, 4, True, (3, 5)),
         ("gpu", 33, 16, True, (2, 80)), ("gpu", 65, 4, True, (3, 5)),
         ("gpu", 65, 16, False, (3, 5)),
         ("tpu", 1, 16, False, (3, 5)), ("tpu", 7, 8, True, (3, 5)),
         ("tpu", 33, 16, True, (5, 128)), ("tpu", 65, 32, True, (3, 5)),
         ("tpu", 65, 8, False, (3, 5))]


def _inputs(seed, *, time, segments, rest=(3, 5)):
  """``(a, b, h0)``, the ``[B, T]`` segment ids (or None) and a cotangent for
  each output. With segments, ``a`` is 0 where a document starts (what the op
  passes its implementations)."""
  keys = jax.random.split(jax.random.key(seed), 6)
  a = jax.nn.sigmoid(jax.random.normal(keys[0], (BATCH, time, *rest)) + 1.5)
  b = jax.random.normal(keys[1], (BATCH, time, *rest))
  h0 = jax.random.normal(keys[2], (BATCH, *rest))
  cotangents = (jax.random.normal(keys[3], (BATCH, time, *rest)),
                jax.random.normal(keys[4], (BATCH, *rest)))
  segment_ids = None
  if segments:
    starts = np.array(jax.random.bernoulli(keys[5], 0.1, (BATCH, time)))
    starts[0, min(16, time - 1)] = True  # a document that starts at a block boundary
    starts[1, min(5, time - 1):min(7, time)] = True  # a document of one token
    starts[:, 0] = False
    segment_ids = jnp.asarray(np.cumsum(starts, axis=1, dtype=np.int32))
    a = jnp.where(jnp.asarray(starts).reshape(starts.shape + (1,) * len(rest)), 0.0, a)
  return (a, b, h0), segment_ids, cotangents


def _outputs_and_grads(fn, args, cotangents):
  outputs, vjp = jax.vjp(fn, *args)
  return outputs, vjp(tuple(c.astype(o.dtype) for c, o in zip(cotangents, outputs)))


_oracle = jax.jit(functools.partial(_outputs_and_grads,
                                    functools.partial(scan_op._recurrent, chunk_size=1)),
                  compiler_options=FAST_COMPILE)


def _kernel(args, cotangents, *, backend, chunk_size, interpret=True, poison=True):
  fn = functools.partial(scan_kernels.linear_scan_kernel, backend=backend, chunk_size=chunk_size,
                         interpret=interpret, poison_outputs=poison)
  return jax.jit(functools.partial(_outputs_and_grads, fn),
                 compiler_options=FAST_COMPILE)(args, cotangents)


def _assert_matches(got, ref, tol):
  assert_outputs_and_grads_match(got, ref, tol, _OUTPUTS, _INPUTS)


@pytest.mark.parametrize("backend, time, chunk_size, segments, rest", CASES)
def test_float32_matches_recurrent_oracle(backend, time, chunk_size, segments, rest):
  args, segment_ids, cotangents = _inputs(time, time=time, segments=segments, rest=rest)
  if segments and time > 16:
    assert (np.diff(segment_ids, axis=1) > 0).sum() >= 4  # several documents per batch
  got = _kernel(args, cotangents, backend=backend, chunk_size=chunk_size)
  _assert_matches(got, _oracle(args, cotangents), F32_TOL)


@pytest.mark.parametrize("backend, chunk_size", [("gpu", 4), ("tpu", 16)])
def test_segment_resets_match_the_op(backend, chunk_size):
  # The op resets the state by zeroing a where a document starts; doing the
  # same in front of the kernel equals ops.linear_scan with segment_ids,
  # gradients included (none reaches a at a document start).
  (a, b, h0), segment_ids, cotangents = _inputs(4, time=40, segments=True)
  starts = (segment_ids != jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)),
                                   constant_values=-1))[..., None, None]
  starts = starts.at[:, 0].set(False)
  kernel = functools.partial(scan_kernels.linear_scan_kernel, backend=backend,
                             chunk_size=chunk_size, interpret=True)
  run_kernel = lambda a, b, h0: kernel(jnp.where(starts, 0.0, a), b, h0)
  run_op = lambda a, b, h0: ops.linear_scan(a, b, h0, segment_ids=segment_ids, impl="recurrent")
  fast = lambda fn: jax.jit(functools.partial(_outputs_and_grads, fn),
                            compiler_options=FAST_COMPILE)
  got = fast(run_kernel)((a, b, h0), cotangents)
  ref = fast(run_op)((a, b, h0), cotangents)
  _assert_matches(got, ref, F32_TOL)
  assert np.all(np.asarray(got[1][0])[np.asarray(jnp.broadcast_to(starts, a.shape))] == 0)


def test_tpu_interpreter_matches_recurrent_oracle():
  # The TPU interpreter models VMEM scratch and the write-back of output
  # blocks that stay resident across the time axis (h_last, dh0).
  args, _, cotangents = _inputs(33, time=33, segments=True)
  got = _kernel(args, cotangents, backend="tpu", chunk_size=16,
                interpret=pltpu.InterpretParams())
  _assert_matches(got, _oracle(args, cotangents), F32_TOL)


@pytest.mark.parametrize("backend, time, chunk_size", [("gpu", 65, 16), ("tpu", 65, 32)])
def test_bfloat16_inputs_match_float32_oracle(backend, time, chunk_size):
  (a, b, h0), _, cotangents = _inputs(100 + time, time=time, segments=True)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  rounded = (bf16(a).astype(jnp.float32), bf16(b).astype(jnp.float32), h0)
  got = _kernel((bf16(a), bf16(b), h0), cotangents, backend=backend, chunk_size=chunk_size)
  assert [g.dtype for g in got[1]] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
  _assert_matches(got, _oracle(rounded, cotangents), BF16_TOL)


def test_poisoned_outputs_expose_unwritten_gpu_rows(monkeypatch):
  gpu_rows = kernel_module._gpu_rows

  def without_leftover_rows(plan, step, carry, *, reverse):
    return gpu_rows(dataclasses.replace(plan, time=plan.time // plan.time_block * plan.time_block),
                    step, carry, reverse=reverse)

  monkeypatch.setattr(kernel_module, "_gpu_rows", without_leftover_rows)
  (a, b, h0), _, _ = _inputs(3, time=7, segments=False)
  h, _ = jax.jit(functools.partial(scan_kernels.linear_scan_kernel, backend="gpu",
                                   chunk_size=4, interpret=True, poison_outputs=True))(a, b, h0)
  assert np.isnan(h[:, 4:]).all() and np.isfinite(h[:, :4]).all()


def test_poisoned_outputs_expose_an_unwritten_tpu_block(monkeypatch):
  specs = kernel_module._specs

  def never_block_zero(plan, *, reverse):
    per_row, per_state, per_block_state = specs(plan, reverse=reverse)
    index_map = per_row.index_map
    return (pl.BlockSpec(per_row.block_shape,
                         lambda b, d, n: index_map(b, d, jnp.maximum(n, 1))),
            per_state, per_block_state)

  monkeypatch.setattr(kernel_module, "_specs", never_block_zero)
  (a, b, h0), _, _ = _inputs(3, time=33, segments=False)
  h, _ = jax.jit(functools.partial(scan_kernels.linear_scan_kernel, backend="tpu",
                                   chunk_size=16, interpret=True, poison_outputs=True))(a, b, h0)
  assert np.isnan(h[:, :16]).all() and np.isfinite(h[:, 16:]).all()


def test_registry_entry_has_the_private_signature_and_runs_on_cpu():
  assert inspect.signature(scan_kernels.linear_scan) == inspect.signature(scan_op._recurrent)
  args, _, _ = _inputs(11, time=7, segments=True)
  got = jax.jit(functools.partial(scan_kernels.linear_scan, chunk_size=64))(*args)
  ref = scan_op._recurrent(*args, chunk_size=64)
  for name, x, x_ref in zip(_OUTPUTS, got, ref):
    assert_close(x, x_ref, F32_TOL, name)


@pytest.mark.parametrize("backend, platform, target", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_and_backward_lower_for_the_backend(backend, platform, target, dtype):
  # Builds the Triton IR / Mosaic module on CPU: block shapes and every
  # primitive have a lowering. Compiling them needs the hardware.
  spec = jax.ShapeDtypeStruct
  fn = functools.partial(scan_kernels.linear_scan_kernel, chunk_size=64, backend=backend)
  def forward_and_backward(a, b, h0):
    outputs, vjp = jax.vjp(fn, a, b, h0)
    return vjp(outputs)
  x = spec((2, 300, 4, 96), dtype)
  lowered = jax.jit(forward_and_backward).trace(
      x, x, spec((2, 4, 96), jnp.float32)).lower(lowering_platforms=(platform,))
  assert lowered.as_text().count(f"@{target}(") == 2  # the forward and the backward kernel


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_supports_gpu_and_tpu_never_cpu(dtype):
  for time in (1, 7, 4096):
    assert not scan_kernels.supports(backend="cpu", time=time, dtype=dtype)
    for backend in ("gpu", "tpu"):
      assert scan_kernels.supports(backend=backend, time=time, dtype=dtype)


def test_supports_rejects_other_dtypes_and_empty_sequences():
  supports = scan_kernels.supports
  for backend in ("gpu", "tpu"):
    assert not supports(backend=backend, time=64, dtype=jnp.float16)
    assert not supports(backend=backend, time=64, dtype=jnp.float64)
    assert not supports(backend=backend, time=0, dtype=jnp.float32)
  assert not supports(backend="rocm", time=64, dtype=jnp.float32)


def test_unsupported_dtype_raises():
  (a, b, h0), _, _ = _inputs(0, time=7, segments=False)
  with pytest.raises(ValueError, match="float16"):
    scan_kernels.linear_scan_kernel(a.astype(jnp.float16), b.astype(jnp.float16), h0,
                                    backend="gpu", interpret=True)
