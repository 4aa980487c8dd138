r"""Times every op and implementation, forward and forward+backward.

    python -m experiments.op_bench                      # every op, every impl
    python -m experiments.op_bench --seq_len 512 --heads 2 --ops linear_scan

For each (op, impl) the op is jitted on fresh random inputs of shape
``[batch, seq_len, heads, head_dim]`` (``K = V = head_dim``; the element-wise
ops run on ``[batch, seq_len, heads·head_dim]``), compiled once (the compile
time is reported on its own), warmed up, then timed ``--repeats`` times; the
median is reported. Forward+backward is ``jax.grad`` of ``Σ o ⊙ c`` (``c`` a
fixed random cotangent) with respect to every float input. In the same run
the machine's float32 matmul throughput is measured — one dense
``2048 × 2048 × 2048`` ``jnp.dot`` (the *peak*) and, for reference, 1024
batched ``64 × 64 × 64`` matmuls — so "% of peak" compares each op with what
this machine's matmul unit does under the same conditions.

Ops (``--ops``):

* ``linear_attention_{none,scalar,vector}`` — no decay, one log-decay per head
  ``[B, T, H]``, one per key channel ``[B, T, H, K]`` (GLA).
* ``linear_attention_normalized`` — Based-style ``normalize=True`` with
  positive feature-mapped ``q, k`` (``elu + 1``), no decay.
* ``linear_scan`` — ``a, b`` of shape ``[B, T, H·head_dim]``.
* ``mlstm`` — the xLSTM matrix memory, forget-gate pre-activations ``n + 3``.
* ``softmax_attention`` (full causal) and ``softmax_attention_window``
  (window 256).
* ``causal_conv1d`` — width 4 over ``[B, T, H·head_dim]``.

Log-decays are ``log σ(n + 3)`` with ``n`` standard normal (``a = σ(n + 3)``
for ``linear_scan``). Ops with an ``impl=`` registry run every registered
implementation plus ``auto`` (reported with the implementation it resolves
to); ops without one run their single form, named ``default``. A failure
(an implementation that does not support the call, out of memory, …) is
recorded in its row and the run goes on.

FLOP counts, forward, per batch row and head (``T`` time, ``C`` chunk,
``K, V`` key/value dims, ``D`` head dim; masked halves are counted, since the
algorithm computes them):

* linear attention, ``chunked``: ``T·(2C·K + 2C·V + 4·K·V)`` — the
  intra-chunk ``QKᵀ`` (``2C·K`` per token) and ``AV`` (``2C·V``), the
  inter-chunk ``q·S`` and the chunk state ``kᵀv`` (``2K·V`` each); ``T`` is
  padded up to a multiple of ``C = min(chunk_size, T)``, as the
  implementation does. Vector decay (GLA) is counted with the same matmul
  FLOPs; its element-wise decay work (the diagonal sub-chunk blocks and the
  rescaled keys) is not counted. ``pallas`` is counted as ``chunked``.
* linear attention, ``recurrent``: ``T·4·K·V`` (the outer product ``k vᵀ``
  and the read ``qᵀS``); ``parallel``: ``2T²·(K + V)``.
* ``normalize=True`` adds one value column: ``V + 1`` in every formula;
  ``mlstm`` is counted as linear attention with that column.
* ``linear_scan``: 2 per element, every implementation.
* softmax attention: ``4·T²·D`` full (``QKᵀ`` and ``PV``, masked half
  included); ``4·T·min(w, T)·D`` with a window ``w`` — the useful work, even
  where the backend computes the whole masked ``T × T`` product.
* ``causal_conv1d``: ``2·W`` per element (``W = 4`` taps).
* forward+backward is counted as 3× forward, for every op.

``auto`` is counted as the implementation it resolves to. GFLOP/s = FLOPs /
median time; % of peak = GFLOP/s / the dense 2048³ matmul GFLOP/s; the
speed-up is the ``recurrent`` time of the same op over this row's time.

The table goes to stdout, a progress line per measurement to stderr, and a
JSON record (machine, flags, matmul figures, one record per row) to
``--json_out``; an existing file is never overwritten: the run writes to the
first free ``<name>-<n>.json`` instead and says so. The JSON is rewritten
after every row, so a run that dies midway leaves the rows it finished.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import jaxlib

from recurrent_lm import ops as rlm_ops
from recurrent_lm.ops import feature_maps

_WINDOW = 256
_CONV_WIDTH = 4
_DEFAULT_IMPL = "default"  # the single form of an op without an impl= registry
_FWD_BWD_FLOP_FACTOR = 3
_MATMUL_SIZE = 2048
_BATCHED_MATMUL = (1024, 64)  # (count, size): 1024 matmuls of 64 × 64 × 64
_ERROR_WIDTH = 60  # characters of an error shown in the table; the JSON keeps all

ROW_KEYS = (
    "op", "impl", "resolved_impl", "fwd_ms", "fwd_bwd_ms", "compile_fwd_s",
    "compile_fwd_bwd_s", "flops_fwd", "flops_fwd_bwd", "gflops_fwd",
    "gflops_fwd_bwd", "pct_peak_fwd", "pct_peak_fwd_bwd", "speedup_fwd",
    "speedup_fwd_bwd", "wall_s", "error")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class BenchShape:
  """The problem every op is timed on.

  Attributes:
    batch: ``B``.
    seq_len: ``T``.
    heads: ``H``.
    head_dim: ``K = V = D``; the element-wise ops run on ``H·head_dim`` channels.
    chunk_size: chunk length of the ``chunked`` implementations.
    dtype: ``"float32"`` or ``"bfloat16"``, the dtype of every input.
  """
  batch: int = 1
  seq_len: int = 8192
  heads: int = 8
  head_dim: int = 64
  chunk_size: int = 64
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("batch", "seq_len", "heads", "head_dim", "chunk_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}; expected one of {', '.join(_DTYPES)}")

  @property
  def width(self) -> int:
    """Channels of the element-wise ops: ``H·head_dim``."""
    return self.heads * self.head_dim


# ---------------------------------------------------------------------------
# The ops: inputs, call, FLOPs.


def _impl_kwargs(impl):
  """``impl=`` for an op that has grown a registry; nothing for its single form."""
  return {} if impl == _DEFAULT_IMPL else {"impl": impl}


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _log_decay(key, shape, dtype):
  return jax.nn.log_sigmoid(jax.random.normal(key, shape, jnp.float32) + 3).astype(dtype)


def _linear_attention_flops(impl, shape, *, normalize):
  t, d = shape.seq_len, shape.head_dim
  v = d + normalize
  if impl == "recurrent":
    per_head = t * 4 * d * v
  elif impl == "parallel":
    per_head = 2 * t * t * (d + v)
  elif impl in ("chunked", "pallas"):
    chunk = min(shape.chunk_size, t)
    padded = -(-t // chunk) * chunk
    per_head = padded * (2 * chunk * d + 2 * chunk * v + 4 * d * v)
  else:
    return None
  return float(shape.batch * shape.heads * per_head)


@dataclasses.dataclass(frozen=True)
class _Op:
  """How to benchmark one op.

  Attributes:
    module: the module holding the op (and its ``REGISTRY``, if it has one).
    make_inputs: ``(key, shape) -> tuple`` of float arrays; all differentiated.
    call: ``(impl, shape, *inputs) -> output``; ``impl`` is ignored by ops
      without a registry.
    flops: ``(impl, shape) -> forward FLOPs`` of the algorithm ``impl`` runs,
      or None where it is not known.
    describe: ``shape -> keywords`` describing the call to ``REGISTRY.resolve``,
      to name the implementation ``auto`` picks; None without a registry.
  """
  module: str
  make_inputs: Callable[..., tuple[jax.Array, ...]]
  call: Callable[..., Any]
  flops: Callable[[str, BenchShape], float | None]
  describe: Callable[[BenchShape], dict[str, Any]] | None = None


def _linear_attention_op(decay, normalize=False):
  """``decay``: ``"none" | "scalar" | "vector"``."""

  def make_inputs(key, shape):
    dtype = _DTYPES[shape.dtype]
    bthd = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
    kq, kk, kv, kg = jax.random.split(key, 4)
    q, k, v = _normal(kq, bthd, dtype), _normal(kk, bthd, dtype), _normal(kv, bthd, dtype)
    if normalize:
      q, k = feature_maps.elu_plus_one(q), feature_maps.elu_plus_one(k)
    if decay == "none":
      return q, k, v
    return q, k, v, _log_decay(kg, bthd[:3] if decay == "scalar" else bthd, dtype)

  def call(impl, shape, q, k, v, log_decay=None):
    return rlm_ops.linear_attention(q, k, v, log_decay=log_decay, normalize=normalize,
                                    chunk_size=shape.chunk_size, impl=impl)

  def describe(shape):
    return dict(time=shape.seq_len, decay=decay, causal=True, normalize=normalize,
                dtype=jnp.dtype(_DTYPES[shape.dtype]), chunk_size=shape.chunk_size)

  def flops(impl, shape):
    return _linear_attention_flops(impl, shape, normalize=normalize)

  return _Op("recurrent_lm.ops.linear_attention", make_inputs, call, flops, describe)


def _mlstm_inputs(key, shape):
  dtype = _DTYPES[shape.dtype]
  bthd = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
  kq, kk, kv, ki, kf = jax.random.split(key, 5)
  return (_normal(kq, bthd, dtype), _normal(kk, bthd, dtype), _normal(kv, bthd, dtype),
          _normal(ki, bthd[:3], dtype), _normal(kf, bthd[:3], dtype) + 3)


def _mlstm_call(impl, shape, q, k, v, input_gate, forget_gate):
  return rlm_ops.mlstm(q, k, v, input_gate, forget_gate, chunk_size=shape.chunk_size,
                       impl=impl)


def _mlstm_flops(impl, shape):
  # The chunked forms cost what chunked linear attention with a normaliser
  # column costs; the recurrent and parallel forms likewise.
  return _linear_attention_flops(impl, shape, normalize=True)


def _linear_scan_inputs(key, shape):
  dtype = _DTYPES[shape.dtype]
  btd = (shape.batch, shape.seq_len, shape.width)
  ka, kb = jax.random.split(key)
  return jnp.exp(_log_decay(ka, btd, jnp.float32)).astype(dtype), _normal(kb, btd, dtype)


def _linear_scan_call(impl, shape, a, b):
  return rlm_ops.linear_scan(a, b, chunk_size=shape.chunk_size, impl=impl)


def _elementwise_flops(per_element):
  def flops(impl, shape):
    del impl
    return float(per_element * shape.batch * shape.seq_len * shape.width)
  return flops


def _softmax_attention_op(window):

  def make_inputs(key, shape):
    dtype = _DTYPES[shape.dtype]
    bthd = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
    return tuple(_normal(k, bthd, dtype) for k in jax.random.split(key, 3))

  def call(impl, shape, q, k, v):
    del shape
    return rlm_ops.softmax_attention(q, k, v, window=window, **_impl_kwargs(impl))

  def flops(impl, shape):
    del impl
    t = shape.seq_len
    keys = t if window is None else min(window, t)
    return float(4 * shape.batch * shape.heads * t * keys * shape.head_dim)

  return _Op("recurrent_lm.ops.softmax_attention", make_inputs, call, flops)


def _conv_inputs(key, shape):
  dtype = _DTYPES[shape.dtype]
  kx, kw = jax.random.split(key)
  return (_normal(kx, (shape.batch, shape.seq_len, shape.width), dtype),
          _normal(kw, (_CONV_WIDTH, shape.width), dtype))


def _conv_call(impl, shape, x, weight):
  del shape
  return rlm_ops.causal_conv1d(x, weight, **_impl_kwargs(impl))


OPS: dict[str, _Op] = {
    "linear_attention_none": _linear_attention_op("none"),
    "linear_attention_scalar": _linear_attention_op("scalar"),
    "linear_attention_vector": _linear_attention_op("vector"),
    "linear_attention_normalized": _linear_attention_op("none", normalize=True),
    "linear_scan": _Op("recurrent_lm.ops.linear_scan", _linear_scan_inputs,
                       _linear_scan_call, _elementwise_flops(2),
                       lambda shape: dict(time=shape.seq_len,
                                          dtype=jnp.dtype(_DTYPES[shape.dtype]))),
    "mlstm": _Op("recurrent_lm.ops.mlstm", _mlstm_inputs, _mlstm_call, _mlstm_flops,
                 lambda shape: dict(time=shape.seq_len, dtype=jnp.dtype(_DTYPES[shape.dtype]),
                                    chunk_size=shape.chunk_size)),
    "softmax_attention": _softmax_attention_op(None),
    "softmax_attention_window": _softmax_attention_op(_WINDOW),
    "causal_conv1d": _Op("recurrent_lm.ops.causal_conv1d", _conv_inputs, _conv_call,
                         _elementwise_flops(2 * _CONV_WIDTH)),
}


def _op(name: str) -> _Op:
  if name not in OPS:
    raise ValueError(f"op {name!r} is unknown; expected one of {', '.join(OPS)}")
  return OPS[name]


def _registry(name: str):
  return getattr(importlib.import_module(_op(name).module), "REGISTRY", None)


def default_impls(op: str) -> tuple[str, ...]:
  """Every implementation registered for ``op``, then ``auto``; ``("default",)``
  for an op without an ``impl=`` registry. On CPU ``pallas`` is left out: it
  runs there only in interpret mode (``--impls=pallas`` still asks for it)."""
  registry = _registry(op)
  if registry is None:
    return (_DEFAULT_IMPL,)
  names = registry.names
  if jax.default_backend() == "cpu":   # kernels only interpret on CPU: not a timing
    names = tuple(name for name in names if name != "pallas")
  return names + ("auto",)


def resolve_impl(op: str, impl: str, shape: BenchShape) -> str | None:
  """The implementation ``impl`` runs for ``op`` at ``shape`` (``auto`` resolved);
  None where the op has no registry or nothing supports the call."""
  registry = _registry(op)
  if registry is None:
    return None
  if impl != "auto":
    return impl
  if _op(op).describe is None:
    return None
  try:
    return registry.resolve("auto", **_op(op).describe(shape)).name
  except ValueError:
    return None


def flop_count(op: str, impl: str, shape: BenchShape) -> float | None:
  """Forward FLOPs of ``op`` run by ``impl`` at ``shape`` (module docstring).

  ``auto`` is counted as the implementation it resolves to; None where the
  algorithm is not known.
  """
  resolved = resolve_impl(op, impl, shape) if impl == "auto" else impl
  return None if resolved is None else _op(op).flops(resolved, shape)


# ---------------------------------------------------------------------------
# Measuring.


def _compile(fn, args):
  """``(compiled fn, seconds spent tracing, lowering and compiling)``."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _median_ms(fn, args, *, repeats, warmup):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _check_repeats(repeats, warmup):
  if not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats={repeats!r}; expected a positive int")
  if not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f"warmup={warmup!r}; expected a non-negative int")


def _gflops(flops, ms):
  if flops is None or not ms:
    return None
  return flops / (ms * 1e-3) / 1e9


def measure_matmul_peak(size: int = _MATMUL_SIZE,
                        batched: tuple[int, int] = _BATCHED_MATMUL, *,
                        repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
  """Float32 matmul throughput of this machine.

  Args:
    size: ``n`` of the dense ``n × n × n`` ``jnp.dot`` whose throughput is the peak.
    batched: ``(count, n)``: ``count`` independent ``n × n × n`` matmuls in one
      batched call, for reference.
    repeats: timed calls; the median is reported.
    warmup: untimed calls after compiling.
    seed: seed of the random operands.

  Returns:
    ``{"dense": figures, "batched": figures, "peak_gflops": dense GFLOP/s}``,
    each ``figures`` holding ``count, m, n, k, flops, ms, gflops``.
  """
  _check_repeats(repeats, warmup)
  count, small = batched
  for name, value in (("size", size), ("batched count", count), ("batched size", small)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"matmul {name}={value!r}; expected a positive int")
  key_a, key_b, key_c, key_d = jax.random.split(jax.random.key(seed), 4)
  figures = {}
  for name, batch, n, a, b in (
      ("dense", 1, size, _normal(key_a, (size, size), jnp.float32),
       _normal(key_b, (size, size), jnp.float32)),
      ("batched", count, small, _normal(key_c, (count, small, small), jnp.float32),
       _normal(key_d, (count, small, small), jnp.float32))):
    fn, _ = _compile(jnp.matmul if batch > 1 else jnp.dot, (a, b))
    ms = _median_ms(fn, (a, b), repeats=repeats, warmup=warmup)
    flops = float(2 * batch * n ** 3)
    figures[name] = dict(count=batch, m=n, n=n, k=n, flops=flops, ms=ms,
                         gflops=_gflops(flops, ms))
  figures["peak_gflops"] = figures["dense"]["gflops"]
  return figures


def empty_row(op: str, impl: str) -> dict[str, Any]:
  """A row of :data:`ROW_KEYS` with only ``op`` and ``impl`` filled in."""
  row = dict.fromkeys(ROW_KEYS)
  row.update(op=op, impl=impl)
  return row


def bench_op(op: str, impl: str, shape: BenchShape, *, repeats: int = 5,
             warmup: int = 1, backward: bool = True,
             peak_gflops: float | None = None, seed: int = 0) -> dict[str, Any]:
  """Times ``op`` with ``impl`` at ``shape``: forward and forward+backward.

  Args:
    op: a key of :data:`OPS`.
    impl: an implementation of ``op`` (:func:`default_impls`).
    shape: the problem size and dtype.
    repeats: timed calls per measurement; the median is reported.
    warmup: untimed calls after compiling.
    backward: also time ``jax.grad`` with respect to every input.
    peak_gflops: matmul peak, for the ``pct_peak_*`` entries (None leaves them None).
    seed: seed of the inputs and the cotangent; the same for every impl.

  Returns:
    A row with every key of :data:`ROW_KEYS`: times in ms, compile times
    (tracing, lowering and compiling) and ``wall_s`` (the whole measurement)
    in s, FLOPs, GFLOP/s, % of peak (``speedup_*`` stay None: see
    :func:`add_speedups`). If the implementation fails, ``error`` holds the
    message and the measurements that did not complete stay None.
  """
  spec = _op(op)
  _check_repeats(repeats, warmup)
  start = time.perf_counter()
  row = empty_row(op, impl)
  row["resolved_impl"] = resolve_impl(op, impl, shape)
  flops = flop_count(op, impl, shape)
  row["flops_fwd"] = flops
  if flops is not None and backward:
    row["flops_fwd_bwd"] = _FWD_BWD_FLOP_FACTOR * flops

  def forward(*xs):
    return spec.call(impl, shape, *xs)

  def loss(*xs_and_cotangent):
    *xs, cotangent = xs_and_cotangent
    return jnp.sum(forward(*xs)[0].astype(jnp.float32) * cotangent)

  try:
    key_inputs, key_cotangent = jax.random.split(jax.random.key(seed))
    inputs = spec.make_inputs(key_inputs, shape)
    fn, row["compile_fwd_s"] = _compile(forward, inputs)
    row["fwd_ms"] = _median_ms(fn, inputs, repeats=repeats, warmup=warmup)
    if backward:
      o_shape = jax.eval_shape(forward, *inputs)[0].shape
      args = inputs + (_normal(key_cotangent, o_shape, jnp.float32),)
      grad = jax.grad(loss, argnums=tuple(range(len(inputs))))
      fn, row["compile_fwd_bwd_s"] = _compile(grad, args)
      row["fwd_bwd_ms"] = _median_ms(fn, args, repeats=repeats, warmup=warmup)
  except Exception as error:  # pylint: disable=broad-except
    # A failing implementation is a result to report, not a reason to stop.
    row["error"] = f"{type(error).__name__}: {error}"

  for part in ("fwd", "fwd_bwd"):
    row[f"gflops_{part}"] = _gflops(row[f"flops_{part}"], row[f"{part}_ms"])
    if peak_gflops and row[f"gflops_{part}"] is not None:
      row[f"pct_peak_{part}"] = 100 * row[f"gflops_{part}"] / peak_gflops
  row["wall_s"] = time.perf_counter() - start
  return row


def add_speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Copies of ``rows`` with ``speedup_*`` = the same op's ``recurrent`` time / the row's time.

  Left None where the op has no timed ``recurrent`` row or the row has no time.
  """
  reference = {(row["op"], part): row[f"{part}_ms"]
               for row in rows if row["impl"] == "recurrent" for part in ("fwd", "fwd_bwd")}
  out = []
  for row in rows:
    row = dict(row)
    for part in ("fwd", "fwd_bwd"):
      base, ms = reference.get((row["op"], part)), row[f"{part}_ms"]
      row[f"speedup_{part}"] = None if base is None or not ms else base / ms
    out.append(row)
  return out


def plan(ops: Sequence[str], impls: Sequence[str] | None = None) -> list[tuple[str, str]]:
  """The ``(op, impl)`` pairs to run: every ``impl`` of ``impls`` that each op
  has (all of :func:`default_impls` if None), in registry order.

  Raises:
    ValueError: an op is unknown, or an impl in ``impls`` belongs to none of ``ops``.
  """
  available = {op: default_impls(op) for op in ops}
  if impls is None:
    return [(op, impl) for op in ops for impl in available[op]]
  known = {impl for names in available.values() for impl in names}
  for impl in impls:
    if impl not in known:
      raise ValueError(f"impl {impl!r} belongs to none of the ops {list(ops)}; "
                       f"expected one of {sorted(known)}")
  return [(op, impl) for op in ops for impl in available[op] if impl in impls]


def run_benchmark(pairs: Sequence[tuple[str, str]], shape: BenchShape, *,
                  repeats: int = 5, warmup: int = 1, backward: bool = True,
                  peak_gflops: float | None = None, skip_recurrent_above: int = 0,
                  skip_parallel_above: int = 0,
                  progress: Callable[[str], None] | None = None,
                  on_row: Callable[[list[dict[str, Any]]], None] | None = None
                  ) -> list[dict[str, Any]]:
  """Runs :func:`bench_op` on every pair; returns the rows with speed-ups.

  Args:
    pairs: ``(op, impl)`` pairs, e.g. from :func:`plan`.
    shape: the problem size and dtype.
    repeats: timed calls per measurement.
    warmup: untimed calls after compiling.
    backward: also time forward+backward.
    peak_gflops: matmul peak for the % of peak.
    skip_recurrent_above: if positive and ``shape.seq_len`` exceeds it, the
      ``recurrent`` rows are recorded as skipped instead of run.
    skip_parallel_above: the same for the quadratic ``parallel`` rows.
    progress: called with one line per measurement.
    on_row: called with the rows so far (speed-ups filled in) after every row.
  """
  rows = []
  for i, (op, impl) in enumerate(pairs, 1):
    tag = f"[{i}/{len(pairs)}] {op} / {impl}"
    limit = {"recurrent": skip_recurrent_above, "parallel": skip_parallel_above}.get(impl, 0)
    if 0 < limit < shape.seq_len:
      row = empty_row(op, impl)
      row["error"] = f"skipped: seq_len={shape.seq_len} > skip_{impl}_above={limit}"
    else:
      if progress:
        progress(f"{tag}: measuring")
      row = bench_op(op, impl, shape, repeats=repeats, warmup=warmup,
                     backward=backward, peak_gflops=peak_gflops)
    rows.append(row)
    if progress:
      progress(f"{tag}: {_progress_summary(row)}")
    if on_row:
      on_row(add_speedups(rows))
  return add_speedups(rows)


def _progress_summary(row):
  if row["wall_s"] is None:
    return row["error"]
  parts = [f"{label} {_fmt(row[key])} ms"
           for label, key in (("fwd", "fwd_ms"), ("fwd+bwd", "fwd_bwd_ms"))
           if row[key] is not None]
  parts.append(f"{row['wall_s']:.1f} s wall")
  if row["error"]:
    parts.append(f"error {row['error'][:_ERROR_WIDTH]}")
  return ", ".join(parts)


# ---------------------------------------------------------------------------
# Reporting.


def _fmt(value, suffix=""):
  if value is None:
    return "-"
  if value >= 100:
    return f"{value:.0f}{suffix}"
  if value >= 10:
    return f"{value:.1f}{suffix}"
  if value >= 0.01:
    return f"{value:.2f}{suffix}"
  return f"{value:.2g}{suffix}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as an aligned text table, one line per row.

  GFLOP/s, % of peak and speed-up are those of forward+backward, or of the
  forward pass when no row has a backward time (``--nobackward``).
  """
  part = "fwd_bwd" if any(row["fwd_bwd_ms"] is not None for row in rows) else "fwd"
  label = "fwd+bwd" if part == "fwd_bwd" else "fwd"
  header = ("op", "impl", "fwd ms", "fwd+bwd ms", f"GFLOP/s ({label})",
            "% matmul peak", f"vs recurrent ({label})", "compile s", "error")
  lines = []
  for row in rows:
    impl = row["impl"]
    if row["resolved_impl"] and row["resolved_impl"] != impl:
      impl = f"{impl}→{row['resolved_impl']}"
    compile_s = [row[k] for k in ("compile_fwd_s", "compile_fwd_bwd_s") if row[k] is not None]
    error = row["error"] or ""
    if len(error) > _ERROR_WIDTH:
      error = error[:_ERROR_WIDTH - 1] + "…"
    lines.append((row["op"], impl, _fmt(row["fwd_ms"]), _fmt(row["fwd_bwd_ms"]),
                  _fmt(row[f"gflops_{part}"]), _fmt(row[f"pct_peak_{part}"]),
                  _fmt(row[f"speedup_{part}"], "×"),
                  _fmt(sum(compile_s)) if compile_s else "-", error))
  widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
  left = (0, 1, len(header) - 1)

  def render(line):
    cells = [cell.ljust(w) if i in left else cell.rjust(w)
             for i, (cell, w) in enumerate(zip(line, widths))]
    return "  ".join(cells).rstrip()

  rule = "  ".join("-" * w for w in widths).rstrip()
  return "\n".join([render(header), rule] + [render(line) for line in lines])


def format_matmul(matmul: dict[str, Any]) -> str:
  """Two lines: the dense peak and the batched reference."""
  lines = []
  for name, what in (("dense", "matmul peak"), ("batched", "batched matmul")):
    fig = matmul[name]
    count = f"{fig['count']} × " if fig["count"] > 1 else ""
    lines.append(f"{what:<15} {count}{fig['m']}×{fig['n']}×{fig['k']} float32: "
                 f"{fig['gflops']:.1f} GFLOP/s ({_fmt(fig['ms'])} ms)")
  return "\n".join(lines)


def machine_info() -> dict[str, Any]:
  """The software and hardware the numbers were measured on."""
  device = jax.devices()[0]
  affinity = getattr(os, "sched_getaffinity", None)
  return {
      "jax_version": jax.__version__,
      "jaxlib_version": getattr(jaxlib, "__version__", None),
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "cpus_usable": len(affinity(0)) if affinity else None,
      "matmul_precision": jax.config.jax_default_matmul_precision or "default",
      "python": platform.python_version(),
      "platform": platform.platform(),
      "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def reserve_json_path(path: str | os.PathLike[str]) -> pathlib.Path:
  """Creates ``path`` empty, or the first free ``<stem>-<n><suffix>`` beside it.

  The file is created exclusively, so an existing file is never overwritten,
  even by a concurrent run. Parent directories are created.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  candidate, n = path, 0
  while True:
    try:
      with open(candidate, "x", encoding="utf-8"):
        return candidate
    except FileExistsError:
      n += 1
      candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")


def _dump_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
  text = json.dumps(payload, indent=2, allow_nan=False)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text + "\n", encoding="utf-8")
  tmp.replace(path)


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> pathlib.Path:
  """Writes ``payload`` to ``path``, or beside it if ``path`` exists; returns
  the path written (see :func:`reserve_json_path`)."""
  target = reserve_json_path(path)
  _dump_json(target, payload)
  return target


# ---------------------------------------------------------------------------
# The app.

_BATCH = flags.DEFINE_integer("batch", 1, "Batch size B.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 8192, "Sequence length T.")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads H.")
_HEAD_DIM = flags.DEFINE_integer(
    "head_dim", 64, "Head dimension K = V = D; element-wise ops get H·head_dim channels.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 64, "Chunk length of the chunked impls.")
_OPS_FLAG = flags.DEFINE_list("ops", list(OPS), "Ops to time.")
_IMPLS = flags.DEFINE_list(
    "impls", None, "Implementations to time; default: every registered one and auto.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.")
_SKIP_RECURRENT_ABOVE = flags.DEFINE_integer(
    "skip_recurrent_above", 0,
    "Skip the recurrent impls when seq_len exceeds this; 0 never skips (speed-ups need them).")
_SKIP_PARALLEL_ABOVE = flags.DEFINE_integer(
    "skip_parallel_above", 2048,
    "Skip the quadratic parallel impls when seq_len exceeds this (their [T, T] "
    "masks take minutes and gigabytes at T=8192); 0 never skips.")
_JSON_OUT = flags.DEFINE_string(
    "json_out", "bench_results/op_bench.json",
    "JSON output; if it exists, a numbered name beside it is used instead.")
_BACKWARD = flags.DEFINE_boolean("backward", True, "Also time forward+backward.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(_DTYPES), "Dtype of every input.")


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
  try:
    shape = BenchShape(batch=_BATCH.value, seq_len=_SEQ_LEN.value, heads=_HEADS.value,
                       head_dim=_HEAD_DIM.value, chunk_size=_CHUNK_SIZE.value,
                       dtype=_DTYPE.value)
    _check_repeats(_REPEATS.value, _WARMUP.value)
    pairs = plan(_OPS_FLAG.value, _IMPLS.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from error

  json_path = reserve_json_path(_JSON_OUT.value)
  if json_path != pathlib.Path(_JSON_OUT.value):
    _stderr(f"{_JSON_OUT.value} exists; writing to {json_path} instead")
  info = machine_info()
  flag_values = {name: flags.FLAGS[name].value for name in (
      "batch", "seq_len", "heads", "head_dim", "chunk_size", "ops", "impls", "repeats",
      "warmup", "skip_recurrent_above", "skip_parallel_above", "json_out", "backward", "dtype")}
  print(f"jax {info['jax_version']} on {info['backend']} ({info['device_kind']}, "
        f"{info['cpu_count']} CPUs); B={shape.batch} T={shape.seq_len} H={shape.heads} "
        f"D={shape.head_dim} C={shape.chunk_size} {shape.dtype}", flush=True)

  _stderr("measuring the matmul peak")
  matmul = measure_matmul_peak(repeats=_REPEATS.value, warmup=_WARMUP.value)
  print(format_matmul(matmul), flush=True)

  def save(rows, done=False):
    _dump_json(json_path, {"machine": info, "flags": flag_values, "matmul": matmul,
                           "complete": done, "rows": rows})

  rows = run_benchmark(pairs, shape, repeats=_REPEATS.value, warmup=_WARMUP.value,
                       backward=_BACKWARD.value, peak_gflops=matmul["peak_gflops"],
                       skip_recurrent_above=_SKIP_RECURRENT_ABOVE.value,
                       skip_parallel_above=_SKIP_PARALLEL_ABOVE.value,
                       progress=_stderr, on_row=save)
  save(rows, done=True)
  print(format_table(rows))
  print(f"wrote {json_path}")


if __name__ == "__main__":
  app.run(main)
