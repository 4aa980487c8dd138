"""The diagonal (element-wise) linear recurrence, in every form.

    h_t = a_t ⊙ h_{t−1} + b_t,        h_{−1} = h0 (zeros by default)

``a`` and ``b`` are ``[B, T, ...]``; any trailing shape is carried along
element-wise. With ``segment_ids`` ``[B, T]``, the state resets where a new
document starts (``a_t`` is treated as 0 there), so packed rows equal their
documents run one by one; ``h0`` flows into the first segment of the row.
``reverse=True`` runs the same recurrence from the end: ``h_t = a_t ⊙ h_{t+1} + b_t``.

Implementations (``impl=``):

* ``recurrent``   — ``lax.scan`` token by token: the oracle.
* ``associative`` — ``lax.associative_scan`` with the affine-map combine
  ``(a1, b1) ∘ (a2, b2) = (a1·a2, a2·b1 + b2)``: O(log T) depth.
* ``chunked``     — scan inside chunks of ``chunk_size`` for every chunk at
  once, then a short scan of the chunk carries, then one correction
  ``h_t = h_t^local + (∏_{s≤t in chunk} a_s) ⊙ h_chunk_start``. Products of
  ``a`` never get divided, so zeros and tiny decays are exact.
* ``pallas``      — ``pallas_kernels.linear_scan``: time-blocked kernels with
  the carry in registers (GPU) or VMEM (TPU), the backward a reverse-scan
  kernel; bfloat16 inputs stay bfloat16 on the way in.
* ``auto``        — the fastest of these on the current backend (BUILD.md).

The state accumulates in float32 (or the inputs' dtype if wider); ``h`` is
returned in the inputs' dtype and ``h_last`` in the accumulation dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

import pallas_kernels.linear_scan as pallas_linear_scan
from recurrent_lm.ops import _checks
from recurrent_lm.ops._dispatch import Registry, kernel_predicate

_CHUNK = 64


def _acc_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _recurrent(a, b, h0, chunk_size):
  del chunk_size
  def step(h, ab):
    a_t, b_t = ab
    h = a_t * h + b_t
    return h, h

  h_last, h = lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
  return jnp.moveaxis(h, 0, 1), h_last


def _combine(left, right):
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def _associative(a, b, h0, chunk_size):
  del chunk_size
  b = b.at[:, 0].add(a[:, 0] * h0)
  _, h = lax.associative_scan(_combine, (a, b), axis=1)
  return h, h[:, -1]


def _chunked(a, b, h0, chunk_size):
  batch, time = a.shape[:2]
  rest = a.shape[2:]
  chunk = min(chunk_size, time)
  n = -(-time // chunk)
  pad = n * chunk - time
  if pad:
    # a = 1, b = 0 past the end leaves the state unchanged.
    widths = ((0, 0), (0, pad)) + ((0, 0),) * len(rest)
    a = jnp.pad(a, widths, constant_values=1)
    b = jnp.pad(b, widths)
  a = a.reshape(batch, n, chunk, *rest)
  b = b.reshape(batch, n, chunk, *rest)

  # 1. Inside every chunk at once, from a zero state: local h and ∏ a.
  def local_step(carry, ab):
    h, p = carry
    a_t, b_t = ab
    h = a_t * h + b_t
    p = a_t * p
    return (h, p), (h, p)

  zeros = jnp.zeros((batch, n, *rest), a.dtype)
  ones = jnp.ones((batch, n, *rest), a.dtype)
  _, (h_local, a_prod) = lax.scan(
      local_step, (zeros, ones), (jnp.moveaxis(a, 2, 0), jnp.moveaxis(b, 2, 0)))
  # [chunk, B, n, ...]

  # 2. Carry across chunks: h_end[c] = A[c] ⊙ h_end[c−1] + h_local_end[c].
  def carry_step(h, ab):
    a_c, b_c = ab
    h_next = a_c * h + b_c
    return h_next, h

  h_last, h_start = lax.scan(
      carry_step, h0, (jnp.moveaxis(a_prod[-1], 1, 0), jnp.moveaxis(h_local[-1], 1, 0)))
  # h_start: [n, B, ...] — the state entering each chunk.

  # 3. Correct the local states with the state entering their chunk.
  h = h_local + a_prod * jnp.moveaxis(h_start, 0, 1)[None]
  h = jnp.moveaxis(h, 0, 2).reshape(batch, n * chunk, *rest)[:, :time]
  return h, h_last


REGISTRY = Registry(
    "linear_scan",
    auto_order={"cpu": ("recurrent", "associative", "chunked"),
                "default": ("pallas", "associative", "chunked", "recurrent")})
REGISTRY.register("recurrent", _recurrent)
REGISTRY.register("associative", _associative)
REGISTRY.register("chunked", _chunked)
REGISTRY.register("pallas", pallas_linear_scan.linear_scan,
                  kernel_predicate(pallas_linear_scan.supports))


def linear_scan(a, b, h0=None, *, segment_ids=None, reverse=False, impl="auto",
                chunk_size=_CHUNK):
  """Runs ``h_t = a_t ⊙ h_{t−1} + b_t`` over axis 1.

  Args:
    a: ``[B, T, ...]`` multiplicative coefficients (decays, forget gates).
    b: ``[B, T, ...]`` inputs, same shape as ``a``.
    h0: ``[B, ...]`` state before the first step; zeros if None.
    segment_ids: ``[B, T]`` integer document ids; the state resets where the
      id changes (``a_t`` taken as 0 there).
    reverse: run from the last position to the first.
    impl: ``"recurrent" | "associative" | "chunked" | "pallas" | "auto"``.
    chunk_size: chunk length of ``impl="chunked"``.

  Returns:
    ``(h, h_last)``: ``h`` ``[B, T, ...]`` every state, in the inputs' dtype,
    and ``h_last`` ``[B, ...]`` the state after the last step processed
    (position ``T−1``, or position 0 when ``reverse``), in float32 or wider.
  """
  _checks.check_floating("a", a)
  _checks.check_floating("b", b)
  if a.ndim < 2:
    raise ValueError(f"a has shape {_checks.shape_str(a.shape)}; expected [B, T, ...]")
  if b.shape != a.shape:
    raise ValueError(
        f"b has shape {_checks.shape_str(b.shape)}; expected the shape of a, "
        f"{_checks.shape_str(a.shape)}")
  batch, time = a.shape[:2]
  if h0 is not None:
    _checks.check_shape("h0", h0, (batch, *a.shape[2:]))
  _checks.check_segment_ids(segment_ids, batch, time)
  _checks.check_positive_int("chunk_size", chunk_size)
  from recurrent_lm.ops import sequence_parallel   # it imports this module
  if not reverse and sequence_parallel.splits(time):
    return sequence_parallel.split_sequence(
        lambda a, b, ids, h0: sequence_parallel.linear_scan(
            a, b, h0, axis_name=sequence_parallel.SEQUENCE_AXIS, segment_ids=ids, impl=impl,
            chunk_size=chunk_size), (a, b, segment_ids), (h0,), time)
  chosen = REGISTRY.resolve(impl, time=time, dtype=a.dtype)

  out_dtype = jnp.result_type(a.dtype, b.dtype)
  acc = _acc_dtype(out_dtype)
  if chosen.name != "pallas":   # the kernel reads bfloat16 and accumulates in float32
    a, b = a.astype(acc), b.astype(acc)
  h0 = jnp.zeros((batch, *a.shape[2:]), acc) if h0 is None else h0.astype(acc)
  if reverse:
    a, b = jnp.flip(a, 1), jnp.flip(b, 1)
    if segment_ids is not None:
      segment_ids = jnp.flip(segment_ids, 1)
  if segment_ids is not None:
    starts = _checks.segment_starts(segment_ids)
    starts = starts.reshape(starts.shape + (1,) * (a.ndim - 2))
    a = jnp.where(starts, 0, a)

  h, h_last = chosen.fn(a, b, h0, chunk_size)
  if reverse:
    h = jnp.flip(h, 1)
  return h.astype(out_dtype), h_last
