"""Argument checks shared by the ops (one clear line per bad argument) and
the document bookkeeping of packed rows."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def shape_str(shape: Sequence[object]) -> str:
  return "[" + ", ".join(str(d) for d in shape) + "]"


def check_shape(name: str, x, expected: Sequence[object]) -> None:
  """Raises if ``x.shape`` differs from ``expected`` (ints or symbolic names)."""
  ok = len(x.shape) == len(expected) and all(
      not isinstance(e, int) or d == e for d, e in zip(x.shape, expected))
  if not ok:
    raise ValueError(
        f"{name} has shape {shape_str(x.shape)}; expected {shape_str(expected)}")


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
  """Checks floating ``q, k [B, T, H, K]`` and ``v [B, T, H, V]``; returns ``(B, T, H, K, V)``."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_floating(name, x)
  if q.ndim != 4:
    raise ValueError(f"q has shape {shape_str(q.shape)}; expected [B, T, H, K]")
  batch, time, heads, dk = q.shape
  check_shape("k", k, (batch, time, heads, dk))
  if v.ndim != 4 or v.shape[:3] != (batch, time, heads):
    raise ValueError(f"v has shape {shape_str(v.shape)}; expected "
                     f"[B, T, H, V] = {shape_str((batch, time, heads, 'V'))}")
  return batch, time, heads, dk, v.shape[-1]


def check_floating(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} has dtype {x.dtype}; expected a floating dtype")


def check_segment_ids(segment_ids, batch: int, time: int) -> None:
  if segment_ids is None:
    return
  check_shape("segment_ids", segment_ids, (batch, time))
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise TypeError(
        f"segment_ids has dtype {segment_ids.dtype}; expected an integer dtype")


def check_positive_int(name: str, value) -> None:
  if not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}={value!r}; expected a positive int")


def segment_starts(segment_ids):
  """``[B, T]`` bool: True where a new document starts (never at t = 0).

  Position 0 continues whatever state the call was given, so the initial
  state always flows into the first segment of a row.
  """
  changed = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.pad(changed, ((0, 0), (1, 0)))


def document_positions(offset, segment_ids, time: int):
  """``[B, T]`` int32 position of every token in its document.

  Args:
    offset: ``[B]`` int32 position of the first token (from a carried state).
    segment_ids: ``[B, T]`` or None. A new document restarts at 0; position 0
      of the call continues the carried document (as every mixer does).
    time: T.
  """
  t = jnp.arange(time, dtype=jnp.int32)[None, :]
  continued = offset[:, None] + t
  if segment_ids is None:
    return continued
  last_start = jax.lax.cummax(jnp.where(segment_starts(segment_ids), t, -1), axis=1)
  return jnp.where(last_start >= 0, t - last_start, continued)
