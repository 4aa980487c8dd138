"""The diagonal linear recurrence as Pallas kernels (forward and backward).

    h_t = a_t ⊙ h_{t−1} + b_t,        h_{−1} = h0

element-wise over a feature axis ``D`` (every trailing dimension flattened).
The backward is the same recurrence run from the end on the cotangents; with
``dh_t`` the cotangent of ``h_t`` and ``dh_last`` that of ``h_{T−1}``::

    g_t = dh_t + a_{t+1} ⊙ g_{t+1},    g_{T−1} = dh_{T−1} + dh_last
    db_t = g_t,   da_t = g_t ⊙ h_{t−1},   dh0 = a_0 ⊙ g_0

The backward kernel carries ``u_t = a_t ⊙ g_t`` (so ``g_t = dh_t + u_{t+1}``,
``u_T = dh_last``) and reads ``h`` saved by the forward. Both carries are
float32 whatever the input dtype; ``h`` is returned in float32.

Layout: ``a, b, h`` are ``[B, T, D]``; ``h0``, ``h_last`` and their
cotangents are ``[B, 1, D]``. Block shapes come from :func:`_block_shapes`:

* ``gpu`` (Triton): grid ``(B, D / Dg)``; each program owns ``Dg`` features
  (a power of two, ≤ 128) over the whole time axis and walks it row by row in
  a ``fori_loop``, the carry in registers (a Triton grid has no order to carry
  state through). Each loop step loads ``R`` rows before it chains them, so
  their loads are in flight together; leftover rows run one per step. ``T``
  is not padded (only single rows of a power-of-two width are loaded).
* ``tpu`` (Mosaic): grid ``(B, D / Dt, T / Tt)``, the time axis sequential
  (``"arbitrary"``, in reverse for the backward) with the carry in VMEM
  scratch. ``Dt`` is a multiple of 128 lanes, ``Tt`` of the sublane group
  ``G`` (8 rows of float32, 16 of bfloat16, one packed tile). A block is
  scanned a group at a time: a Hillis–Steele scan of the affine maps
  ``(a, b)`` inside the group (``log₂ G`` sublane rolls), then the carry is
  applied, ``h = b_local + (∏ a) ⊙ h_in``. ``T`` is padded with ``a = 1,
  b = 0``, which leaves the state as it was.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._poison import poison

BACKENDS = ("gpu", "tpu")
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# GPU: features per program (a power of two) and the most rows one loop step
# loads ahead of its chain of multiply-adds.
GPU_MAX_FEATURES = 128
GPU_MAX_ROWS = 16
# TPU: the largest feature block (lanes) and time block (sublanes); a
# [512, 512] float32 tile is 1 MiB, and the backward double-buffers five
# (10 MiB, under the 16 MiB of scoped VMEM every generation has by default).
TPU_MAX_FEATURES = 512
TPU_MAX_TIME = 512


def _next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _sublane_group(dtype) -> int:
  """Rows of one TPU tile of ``dtype``: 8 of 32 bits, 16 of bfloat16."""
  return 8 * 4 // jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one call: backend, blocks, padded sizes."""
  backend: str
  interpret: Any  # False, True or pltpu.InterpretParams
  poison: bool
  time: int      # T padded to a multiple of time_block (tpu) or as is (gpu)
  features: int  # D padded to a multiple of feature_block
  time_block: int  # tpu: rows per grid step; gpu: rows loaded per loop step
  feature_block: int
  group: int     # tpu: rows scanned together (one tile)

  @property
  def grid(self) -> tuple[int, ...]:
    if self.backend == "tpu":
      return (self.features // self.feature_block, self.time // self.time_block)
    return (self.features // self.feature_block,)


def _block_shapes(backend: str, *, time: int, features: int, chunk_size: int,
                  dtype) -> tuple[int, int, int, int]:
  """``(time_block, feature_block, padded_time, padded_features)``.

  gpu: the feature block is a power of two (Triton loads), the time block is
  the rows one loop step loads, and ``T`` stays unpadded. tpu: the feature
  block is a multiple of 128 that divides ``D`` rounded up to 128, the time
  block ``chunk_size`` rounded up to a whole sublane group.
  """
  if backend == "gpu":
    block = min(_next_power_of_2(max(features, 16)), GPU_MAX_FEATURES)
    rows = max(1, min(chunk_size, GPU_MAX_ROWS, time))
    return rows, block, time, _round_up(features, block)
  if backend == "tpu":
    group = _sublane_group(dtype)
    rows = _round_up(min(chunk_size, TPU_MAX_TIME, time), group)
    lanes = _round_up(features, 128) // 128
    per_block = max(k for k in range(1, TPU_MAX_FEATURES // 128 + 1) if lanes % k == 0)
    return rows, 128 * per_block, _round_up(time, rows), 128 * lanes
  raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")


def supports(*, backend: str, time: int | None = None, dtype: Any = None) -> bool:
  """Whether :func:`linear_scan` lowers and is exact for this call on ``backend``.

  Any ``time ≥ 1`` and any trailing shape; inputs float32 or bfloat16.
  """
  if backend not in BACKENDS:
    return False
  if time is not None and time < 1:
    return False
  return dtype is None or jnp.dtype(dtype) in DTYPES


# -- GPU: one program per feature block, a loop over time. --------------------


def _row(ref, t):
  """Row ``t`` of a ``[T, D]`` ref as float32 ``[1, D]``."""
  return ref[pl.ds(t, 1), :].astype(jnp.float32)


def _gpu_rows(plan: _Plan, step, carry, *, reverse: bool):
  """Runs ``carry = step(rows, carry)`` over every time row, ``plan.time_block``
  rows per loop step (``rows`` a list of row indices in processing order),
  then the leftover rows one by one; from the end when ``reverse``."""
  rows, time = plan.time_block, plan.time
  n_full = time // rows
  at = (lambda t: time - 1 - t) if reverse else (lambda t: t)

  def full(i, carry):
    return step([at(i * rows + r) for r in range(rows)], carry)

  def single(t, carry):
    return step([at(t)], carry)

  carry = lax.fori_loop(0, n_full, full, carry)
  return lax.fori_loop(n_full * rows, time, single, carry)


def _gpu_forward_kernel(a_ref, b_ref, h0_ref, h_ref, h_last_ref, *, plan: _Plan):
  def step(ts, h):
    # The loads do not depend on the carry: issue them all before the chain.
    ab = [(_row(a_ref, t), _row(b_ref, t)) for t in ts]
    for t, (a, b) in zip(ts, ab):
      h = a * h + b
      h_ref[pl.ds(t, 1), :] = h
    return h

  h_last_ref[...] = _gpu_rows(plan, step, h0_ref[...], reverse=False)


def _gpu_backward_kernel(a_ref, h_ref, h0_ref, dh_ref, dh_last_ref, da_ref, db_ref, dh0_ref, *,
                         plan: _Plan):
  h0 = h0_ref[...]

  def step(ts, u):
    loads = [(_row(a_ref, t), _row(dh_ref, t),
              jnp.where(t == 0, h0, _row(h_ref, jnp.maximum(t - 1, 0)))) for t in ts]
    for t, (a, dh, h_prev) in zip(ts, loads):
      g = dh + u
      db_ref[pl.ds(t, 1), :] = g.astype(db_ref.dtype)
      da_ref[pl.ds(t, 1), :] = (g * h_prev).astype(da_ref.dtype)
      u = a * g
    return u

  dh0_ref[...] = _gpu_rows(plan, step, dh_last_ref[...], reverse=True)


# -- TPU: a sequential grid over time blocks, a scan per sublane group. -------


def _sublane(shape):
  return lax.broadcasted_iota(jnp.int32, shape, 0)


def _pick_row(x, i: int):
  """Row ``i`` of ``x [G, D]`` as ``[1, D]`` (a masked sum: exact, and a
  sublane reduction lowers where an unaligned slice might not)."""
  return jnp.sum(jnp.where(_sublane(x.shape) == i, x, 0.0), axis=0, keepdims=True)


def _group_scan(a, b, *, reverse: bool):
  """Hillis–Steele scan of the affine maps ``x ↦ a_t x + b_t`` down the rows of
  ``[G, D]`` tiles: returns ``(A, B)`` with ``h_t = B_t + A_t h_in``, where
  ``h_in`` enters before row 0 (or after row G−1 when ``reverse``)."""
  size = a.shape[0]
  row = _sublane(a.shape)
  shift = 1
  while shift < size:
    # pltpu.roll is np.roll: rolling by k brings row t − k to row t, so the
    # partner t − shift (t + shift when reverse) arrives by `roll`.
    roll = size - shift if reverse else shift
    has = row + shift < size if reverse else row >= shift
    a_in, b_in = pltpu.roll(a, roll, 0), pltpu.roll(b, roll, 0)
    b = b + a * jnp.where(has, b_in, 0.0)
    a = a * jnp.where(has, a_in, 1.0)
    shift *= 2
  return a, b


def _group_rows(plan: _Plan, j):
  return pl.ds(pl.multiple_of(j * plan.group, plan.group), plan.group)


def _tpu_forward_kernel(a_ref, b_ref, h0_ref, h_ref, h_last_ref, carry_ref, *, plan: _Plan):
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    carry_ref[...] = h0_ref[...]

  def group(j, h_in):
    rows = _group_rows(plan, j)
    a_cum, b_local = _group_scan(a_ref[rows, :].astype(jnp.float32),
                                 b_ref[rows, :].astype(jnp.float32), reverse=False)
    h = b_local + a_cum * h_in
    h_ref[rows, :] = h
    return _pick_row(h, plan.group - 1)

  carry = lax.fori_loop(0, plan.time_block // plan.group, group, carry_ref[...])
  carry_ref[...] = carry

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    h_last_ref[...] = carry


def _tpu_backward_kernel(a_ref, h_ref, h_in_ref, dh_ref, dh_last_ref, da_ref, db_ref, dh0_ref,
                         carry_ref, *, plan: _Plan):
  """Visits the time blocks last to first. ``h_in`` is the state entering this
  block (``h0`` or the last row of the block before)."""
  n = pl.program_id(2)
  n_groups = plan.time_block // plan.group

  @pl.when(n == 0)
  def _():
    carry_ref[...] = dh_last_ref[...]

  def group(i, u):
    j = n_groups - 1 - i
    rows = _group_rows(plan, j)
    a = a_ref[rows, :].astype(jnp.float32)
    h = h_ref[rows, :]
    row = _sublane(h.shape)
    # h_{t−1}: the rows above in this group, then the last row of the group
    # before (or of the block before, for the first group).
    h_above = _pick_row(h_ref[_group_rows(plan, jnp.maximum(j - 1, 0)), :], plan.group - 1)
    h_above = jnp.where(j == 0, h_in_ref[...], h_above)
    h_prev = jnp.where(row == 0, h_above, pltpu.roll(h, 1, 0))
    # g_t = dh_t + a_{t+1} g_{t+1}; the last row takes u (= a g of the row after) as is.
    a_next = jnp.where(row == plan.group - 1, 1.0, pltpu.roll(a, plan.group - 1, 0))
    a_cum, g_local = _group_scan(a_next, dh_ref[rows, :], reverse=True)
    g = g_local + a_cum * u
    db_ref[rows, :] = g.astype(db_ref.dtype)
    da_ref[rows, :] = (g * h_prev).astype(da_ref.dtype)
    return _pick_row(a * g, 0)

  carry = lax.fori_loop(0, n_groups, group, carry_ref[...])
  carry_ref[...] = carry

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = carry


# -- pallas_call plumbing. -----------------------------------------------------


def _specs(plan: _Plan, *, reverse: bool):
  """``(per_row, per_state, per_block_state)`` block specs of ``[B, T, D]``,
  ``[B, 1, D]`` and (tpu only; None on gpu) ``[B, N, 1, D]`` arrays, one
  state per time block. On tpu the time blocks go last to first when
  ``reverse``."""
  features = plan.feature_block
  if plan.backend == "tpu":
    last = plan.time // plan.time_block - 1
    at = (lambda n: last - n) if reverse else (lambda n: n)
    per_row = pl.BlockSpec((None, plan.time_block, features), lambda b, d, n: (b, at(n), d))
    per_state = pl.BlockSpec((None, 1, features), lambda b, d, n: (b, 0, d))
    per_block_state = pl.BlockSpec((None, None, 1, features), lambda b, d, n: (b, at(n), 0, d))
    return per_row, per_state, per_block_state
  per_row = pl.BlockSpec((None, plan.time, features), lambda b, d: (b, 0, d))
  per_state = pl.BlockSpec((None, 1, features), lambda b, d: (b, 0, d))
  return per_row, per_state, None


def _pallas_call(plan: _Plan, kernel, inputs, in_specs, out_shapes, out_specs, name):
  """``pl.pallas_call`` on the plan's grid; with ``plan.poison`` every output
  starts as NaN (aliased NaN inputs the kernel never reads)."""
  batch = inputs[0].shape[0]
  if plan.backend == "tpu":
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    scratch = [pltpu.VMEM((1, plan.feature_block), jnp.float32)]
  else:
    params = pltriton.CompilerParams(num_warps=max(1, plan.feature_block // 32), num_stages=1)
    scratch = []
  aliases = {}
  if plan.poison:
    kernel, inputs, in_specs, aliases = poison(kernel, inputs, in_specs, out_specs, out_shapes)
  return pl.pallas_call(
      kernel, out_shape=out_shapes, grid=(batch, *plan.grid), in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch, input_output_aliases=aliases,
      compiler_params=params, interpret=plan.interpret, name=name)(*inputs)


def _forward(plan: _Plan, a, b, h0):
  per_row, per_state, _ = _specs(plan, reverse=False)
  kernel = _tpu_forward_kernel if plan.backend == "tpu" else _gpu_forward_kernel
  out_shapes = [jax.ShapeDtypeStruct(b.shape, jnp.float32),
                jax.ShapeDtypeStruct(h0.shape, jnp.float32)]
  return _pallas_call(plan, functools.partial(kernel, plan=plan), [a, b, h0],
                      [per_row, per_row, per_state], out_shapes, [per_row, per_state],
                      "linear_scan_forward")


def _backward(plan: _Plan, a, h, h0, dh, dh_last):
  per_row, per_state, per_block_state = _specs(plan, reverse=True)
  if plan.backend == "tpu":
    # The state entering each time block: h0, then the last row of each block.
    blocks_end = h[:, plan.time_block - 1:-1:plan.time_block]
    h_in = jnp.concatenate([h0, blocks_end], axis=1)[:, :, None]
    kernel, h_start, h_start_spec = _tpu_backward_kernel, h_in, per_block_state
  else:
    kernel, h_start, h_start_spec = _gpu_backward_kernel, h0, per_state
  out_shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(a.shape, a.dtype),
                jax.ShapeDtypeStruct(h0.shape, jnp.float32)]
  return _pallas_call(plan, functools.partial(kernel, plan=plan), [a, h, h_start, dh, dh_last],
                      [per_row, per_row, h_start_spec, per_row, per_state], out_shapes,
                      [per_row, per_row, per_state], "linear_scan_backward")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan: _Plan, a, b, h0):
  """``(h [B, T, D], h_last [B, 1, D])`` float32, in the kernel layout."""
  return tuple(_forward(plan, a, b, h0))


def _scan_fwd(plan, a, b, h0):
  h, h_last = _forward(plan, a, b, h0)
  return (h, h_last), (a, h, h0)


def _scan_bwd(plan, residuals, cotangents):
  a, h, h0 = residuals
  dh, dh_last = cotangents
  return tuple(_backward(plan, a, h, h0, dh, dh_last))


_scan.defvjp(_scan_fwd, _scan_bwd)


def linear_scan_kernel(a, b, h0, *, backend: str, chunk_size: int = 64, interpret: Any = False,
                       poison_outputs: bool = False):
  """``h_t = a_t ⊙ h_{t−1} + b_t`` (module docstring) by the kernels of ``backend``.

  Args:
    a, b: ``[B, T, ...]`` float32 or bfloat16 (computed in the wider of the two).
    h0: ``[B, ...]`` the state before the first step (cast to float32).
    backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic): block shapes and grid.
    chunk_size: the time block: rows per grid step on tpu (rounded up to a
      sublane group), rows loaded per loop step on gpu (at most
      ``GPU_MAX_ROWS``). Any positive value.
    interpret: passed to ``pl.pallas_call``: True runs on CPU;
      ``pltpu.InterpretParams()`` runs the tpu kernels in the TPU interpreter.
    poison_outputs: tests only: every kernel output starts as NaN, so an
      element the kernels do not write shows.

  Returns:
    ``(h [B, T, ...], h_last [B, ...])`` float32; differentiable in ``a``,
    ``b`` and ``h0``.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
  if b.shape != a.shape or a.ndim < 2:
    raise ValueError(f"a and b must share one shape [B, T, ...]; got {a.shape} and {b.shape}")
  batch, time, *rest = a.shape
  if h0.shape != (batch, *rest):
    raise ValueError(f"h0 has shape {h0.shape}; expected {(batch, *rest)}")
  dtype = jnp.result_type(a, b)
  if dtype not in DTYPES:
    raise ValueError(f"a and b must be float32 or bfloat16; got {dtype}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r}; expected a positive int")
  features = max(1, int(np.prod(rest)))
  time_block, feature_block, padded_time, padded_features = _block_shapes(
      backend, time=time, features=features, chunk_size=chunk_size, dtype=dtype)
  plan = _Plan(backend, interpret, poison_outputs, padded_time, padded_features, time_block,
               feature_block, _sublane_group(dtype))

  def to_kernel(x, fill):  # [B, T, ...] -> [B, T_pad, D_pad]; a = 1, b = 0 past T
    x = x.astype(dtype).reshape(batch, time, features)
    x = jnp.pad(x, ((0, 0), (0, padded_time - time), (0, 0)), constant_values=fill)
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded_features - features)))

  h0 = jnp.pad(h0.astype(jnp.float32).reshape(batch, 1, features),
               ((0, 0), (0, 0), (0, padded_features - features)))
  h, h_last = _scan(plan, to_kernel(a, 1), to_kernel(b, 0), h0)
  return (h[:, :time, :features].reshape(a.shape),
          h_last[:, 0, :features].reshape(batch, *rest))


def linear_scan(a, b, h0, chunk_size):
  """:func:`linear_scan_kernel` on the default backend: the implementation the
  op registers (``recurrent_lm.ops.linear_scan``'s private signature). On CPU
  it runs the gpu kernels in interpret mode (slow; tests only)."""
  backend = jax.default_backend()
  if backend in BACKENDS:
    return linear_scan_kernel(a, b, h0, backend=backend, chunk_size=chunk_size)
  return linear_scan_kernel(a, b, h0, backend="gpu", chunk_size=chunk_size, interpret=True)
