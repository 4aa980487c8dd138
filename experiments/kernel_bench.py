r"""The Pallas kernels on an accelerator: right, and how fast.

    python -m experiments.kernel_bench                    # on a GPU: the issue-6 table
    python -m experiments.kernel_bench --seq_lens=64 --batch=1 --heads=1 \
        --head_dim=16 --chunk_size=16 --repeats=1 --warmup=0   # CPU: interpret mode

For every sequence length of ``--seq_lens`` and every op of ``--ops`` (the ops
of :mod:`experiments.op_bench` that have a ``"pallas"`` implementation), on
fresh random ``[B, T, H, head_dim]`` inputs in ``--dtype``:

1. **correctness** — the kernel (``impl="pallas"``) against the XLA chunked
   form (``impl="chunked"``) on the same inputs: the output and the gradients
   of ``Σ o ⊙ c`` (``c`` a random cotangent) with respect to every input, as
   ``max |pallas − chunked| / max |chunked|`` over all of them, computed in
   float32. A row whose error exceeds ``--max_error`` is flagged ``WRONG``.
2. **time** — forward and forward+backward of both implementations with
   :func:`experiments.op_bench.bench_op` (compiled once, ``--warmup`` calls,
   median of ``--repeats``, each call ``block_until_ready``).

Beside them, at the same ``B, T, H, head_dim``:

* causal softmax attention by ``jax.nn.dot_product_attention`` with
  ``implementation="cudnn"`` (its error is recorded where cuDNN is absent,
  e.g. on CPU) and with ``implementation="xla"``;
* ``flash-linear-attention``'s Triton ``chunk_simple_gla`` (scalar decay) and
  ``chunk_gla`` (per-channel decay) on the same inputs copied to torch, timed
  with CUDA events, when ``fla`` and a CUDA torch import.

Sizes, dtype, repeats and chunk come from op_bench's flags (``--batch``,
``--heads``, ``--head_dim``, ``--chunk_size``, ``--dtype``, ``--repeats``,
``--warmup``, ``--json_out``), defaulting here to the issue's problem
(:data:`DEFAULTS`).

The matmul peak of the machine is measured in the same run, in float32 and in
bfloat16 (``--matmul_size``³ ``jnp.dot``). The table goes to stdout, progress
to stderr, and everything to ``--json_out`` (never overwriting a file: a
numbered name beside it is used instead). The last lines check the issue's
targets at ``T = 8192`` and ``T = 32768`` where those lengths were run.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import op_bench

OPS = ("linear_attention_scalar", "linear_attention_vector", "linear_attention_none",
       "mlstm", "linear_scan")
_REFERENCE_IMPL = "chunked"

# The problem of the issue, B=8, H=16, K=V=128 in bfloat16: op_bench's flags,
# with these values where the command line does not set them (applied in
# main, so importing this module leaves op_bench's defaults alone).
DEFAULTS = {"batch": 8, "heads": 16, "head_dim": 128, "dtype": "bfloat16", "warmup": 2,
            "json_out": "bench_results/kernel_bench.json"}
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "8192", "32768"], "Sequence lengths T.")
_KERNEL_OPS = flags.DEFINE_list("kernel_ops", list(OPS), "Ops whose kernel is checked and timed.")
_MAX_ERROR = flags.DEFINE_float(
    "max_error", 2e-2, "Largest relative error of a kernel against the chunked form "
    "(bfloat16 inputs; use ~1e-4 with --dtype=float32).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 4096, "n of the n³ matmul peak.")


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def relative_error(op: str, shape: op_bench.BenchShape, *, seed: int = 0) -> float:
  """``max |pallas − chunked| / max |chunked|`` over the output and every gradient."""
  spec = op_bench.OPS[op]
  key_inputs, key_cotangent = jax.random.split(jax.random.key(seed))
  inputs = spec.make_inputs(key_inputs, shape)

  def outputs_and_grads(impl):
    forward = lambda *xs: spec.call(impl, shape, *xs)[0]
    o = jax.eval_shape(forward, *inputs)
    cotangent = op_bench._normal(key_cotangent, o.shape, jnp.float32)
    loss = lambda *xs: jnp.sum(forward(*xs).astype(jnp.float32) * cotangent)
    run = jax.jit(lambda *xs: (forward(*xs), jax.grad(loss, argnums=tuple(range(len(xs))))(*xs)))
    o, grads = run(*inputs)
    return (o, *grads)

  got, want = outputs_and_grads("pallas"), outputs_and_grads(_REFERENCE_IMPL)
  worst = 0.0
  for g, w in zip(got, want):
    g, w = g.astype(jnp.float32), w.astype(jnp.float32)
    worst = max(worst, float(jnp.max(jnp.abs(g - w)) / (jnp.max(jnp.abs(w)) + 1e-30)))
  return worst


def attention_row(implementation: str, shape: op_bench.BenchShape, *, repeats: int,
                  warmup: int) -> dict[str, Any]:
  """Causal ``jax.nn.dot_product_attention`` with ``implementation``, timed like op_bench."""
  row = op_bench.empty_row("dot_product_attention", implementation)
  dtype = op_bench._DTYPES[shape.dtype]
  bthd = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
  q, k, v, c = (op_bench._normal(key, bthd, dtype)
                for key in jax.random.split(jax.random.key(0), 4))
  forward = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=implementation)
  loss = lambda q, k, v, c: jnp.sum(forward(q, k, v).astype(jnp.float32) * c)
  start = time.perf_counter()
  try:
    fn, row["compile_fwd_s"] = op_bench._compile(forward, (q, k, v))
    row["fwd_ms"] = op_bench._median_ms(fn, (q, k, v), repeats=repeats, warmup=warmup)
    fn, row["compile_fwd_bwd_s"] = op_bench._compile(jax.grad(loss, argnums=(0, 1, 2)),
                                                      (q, k, v, c))
    row["fwd_bwd_ms"] = op_bench._median_ms(fn, (q, k, v, c), repeats=repeats, warmup=warmup)
  except Exception as error:  # pylint: disable=broad-except
    row["error"] = f"{type(error).__name__}: {error}"
  row["wall_s"] = time.perf_counter() - start
  return row


def _torch_median_ms(fn: Callable[[], Any], *, repeats: int, warmup: int) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  for _ in range(warmup):
    fn()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
  return statistics.median(times)


def fla_rows(shape: op_bench.BenchShape, *, repeats: int, warmup: int) -> list[dict[str, Any]]:
  """``fla``'s ``chunk_simple_gla`` and ``chunk_gla`` on the op_bench inputs, or
  rows holding the reason they could not run."""
  names = {"linear_attention_scalar": "chunk_simple_gla",
           "linear_attention_vector": "chunk_gla"}
  rows = [op_bench.empty_row(op, f"fla.{fn}") for op, fn in names.items()]
  try:
    import torch  # pylint: disable=import-outside-toplevel
    from fla.ops.gla import chunk_gla  # pylint: disable=import-outside-toplevel
    from fla.ops.simple_gla import chunk_simple_gla  # pylint: disable=import-outside-toplevel
    if not torch.cuda.is_available():
      raise RuntimeError("torch sees no CUDA device")
  except Exception as error:  # pylint: disable=broad-except
    for row in rows:
      row["error"] = f"flash-linear-attention unavailable: {type(error).__name__}: {error}"
    return rows

  to_torch = lambda x: torch.from_numpy(np.asarray(x, np.float32)).cuda().to(
      torch.bfloat16 if shape.dtype == "bfloat16" else torch.float32)
  for row, (op, fn) in zip(rows, ((op, chunk_simple_gla if name == "chunk_simple_gla"
                                   else chunk_gla) for op, name in names.items())):
    start = time.perf_counter()
    try:
      q, k, v, g = (to_torch(x) for x in op_bench.OPS[op].make_inputs(jax.random.key(0), shape))
      g = g.float()
      q, k, v = (x.requires_grad_() for x in (q, k, v))
      cotangent = torch.randn_like(v)
      forward = lambda: fn(q, k, v, g, scale=shape.head_dim ** -0.5)[0]
      row["fwd_ms"] = _torch_median_ms(forward, repeats=repeats, warmup=warmup)
      row["fwd_bwd_ms"] = _torch_median_ms(lambda: forward().backward(cotangent),
                                           repeats=repeats, warmup=warmup)
    except Exception as error:  # pylint: disable=broad-except
      row["error"] = f"{type(error).__name__}: {error}"
    row["wall_s"] = time.perf_counter() - start
  return rows


def matmul_peaks(size: int, *, repeats: int, warmup: int) -> dict[str, float]:
  """GFLOP/s of one ``size``³ ``jnp.dot`` in float32 and in bfloat16."""
  peaks = {}
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    a, b = (op_bench._normal(key, (size, size), dtype)
            for key in jax.random.split(jax.random.key(1), 2))
    fn, _ = op_bench._compile(jnp.dot, (a, b))
    ms = op_bench._median_ms(fn, (a, b), repeats=repeats, warmup=warmup)
    peaks[name] = 2 * size ** 3 / (ms * 1e-3) / 1e9
  return peaks


def _ms(row, part):
  return row.get(f"{part}_ms") if row and not row.get("error") else None


def target_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
  """The issue's targets (forward+backward, scalar decay), where the lengths were run."""
  find = lambda op, impl, t: next((r for r in rows if r["op"] == op and r["impl"] == impl
                                   and r["seq_len"] == t), None)
  lines = []
  op = "linear_attention_scalar"
  pallas, chunked = find(op, "pallas", 8192), find(op, "chunked", 8192)
  fla = find(op, "fla.chunk_simple_gla", 8192)
  if _ms(pallas, "fwd_bwd") and _ms(chunked, "fwd_bwd"):
    ratio = _ms(chunked, "fwd_bwd") / _ms(pallas, "fwd_bwd")
    lines.append(f"T=8192: pallas {ratio:.2f}x faster than the XLA chunked form "
                 f"(target >= 3): {'met' if ratio >= 3 else 'MISSED'}")
  if _ms(pallas, "fwd_bwd") and _ms(fla, "fwd_bwd"):
    ratio = _ms(fla, "fwd_bwd") / _ms(pallas, "fwd_bwd")
    lines.append(f"T=8192: pallas {ratio:.2f}x the speed of fla's chunk_simple_gla "
                 f"(target >= 1): {'met' if ratio >= 1 else 'MISSED'}")
  pallas, cudnn = find(op, "pallas", 32768), find("dot_product_attention", "cudnn", 32768)
  if _ms(pallas, "fwd_bwd") and _ms(cudnn, "fwd_bwd"):
    ratio = _ms(cudnn, "fwd_bwd") / _ms(pallas, "fwd_bwd")
    lines.append(f"T=32768: pallas {ratio:.2f}x faster than cuDNN causal attention "
                 f"(target >= 5): {'met' if ratio >= 5 else 'MISSED'}")
  return lines


def format_table(rows: Sequence[dict[str, Any]], max_error: float) -> str:
  lines = [f"{'T':>6}  {'op':<24} {'impl':<22} {'fwd ms':>9} {'fwd+bwd ms':>11} "
           f"{'vs chunked':>10} {'rel err':>9}"]
  for row in rows:
    base = next((r for r in rows if r["op"] == row["op"] and r["seq_len"] == row["seq_len"]
                 and r["impl"] == _REFERENCE_IMPL), None)
    speedup = (_ms(base, "fwd_bwd") / _ms(row, "fwd_bwd")
               if _ms(base, "fwd_bwd") and _ms(row, "fwd_bwd") else None)
    error = row.get("rel_error")
    flag = "" if error is None or error <= max_error else " WRONG"
    lines.append(
        f"{row['seq_len']:>6}  {row['op']:<24} {row['impl']:<22} "
        f"{op_bench._fmt(_ms(row, 'fwd')):>9} {op_bench._fmt(_ms(row, 'fwd_bwd')):>11} "
        f"{'' if speedup is None else f'{speedup:.2f}x':>10} "
        f"{'' if error is None else f'{error:.1e}':>9}{flag}"
        + (f"  ({row['error'][:70]})" if row.get("error") else ""))
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
  fl = flags.FLAGS
  for name, value in DEFAULTS.items():
    if not fl[name].present:
      fl[name].value = value
  try:
    seq_lens = [int(t) for t in _SEQ_LENS.value]
    shapes = [op_bench.BenchShape(batch=fl.batch, seq_len=t, heads=fl.heads,
                                  head_dim=fl.head_dim, chunk_size=fl.chunk_size,
                                  dtype=fl.dtype) for t in seq_lens]
    unknown = sorted(set(_KERNEL_OPS.value) - set(OPS))
    if unknown:
      raise ValueError(f"--kernel_ops has {unknown}; expected some of {', '.join(OPS)}")
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  repeats, warmup = fl.repeats, fl.warmup

  json_path = op_bench.reserve_json_path(fl.json_out)
  info = op_bench.machine_info()
  print(f"jax {info['jax_version']} on {info['backend']} ({info['device_kind']}); "
        f"B={fl.batch} H={fl.heads} K=V={fl.head_dim} C={fl.chunk_size} {fl.dtype}", flush=True)
  _stderr("measuring the matmul peak")
  peaks = matmul_peaks(_MATMUL_SIZE.value, repeats=repeats, warmup=warmup)
  print(f"matmul peak ({_MATMUL_SIZE.value}³): {peaks['float32']:.1f} GFLOP/s float32, "
        f"{peaks['bfloat16']:.1f} GFLOP/s bfloat16", flush=True)

  rows: list[dict[str, Any]] = []

  def add(row, shape):
    row["seq_len"] = shape.seq_len
    rows.append(row)
    op_bench._dump_json(json_path, {"machine": info, "matmul_gflops": peaks, "rows": rows,
                                    "flags": {n: fl[n].value for n in (
                                        "batch", "heads", "head_dim", "chunk_size", "dtype",
                                        "repeats", "warmup", "seq_lens", "kernel_ops")}})

  for shape in shapes:
    for op in _KERNEL_OPS.value:
      _stderr(f"T={shape.seq_len} {op}: checking the kernel against {_REFERENCE_IMPL}")
      try:
        error = relative_error(op, shape)
      except Exception as failure:  # pylint: disable=broad-except
        error, reason = None, f"{type(failure).__name__}: {failure}"
      else:
        reason = None
      for impl in ("pallas", _REFERENCE_IMPL):
        _stderr(f"T={shape.seq_len} {op}: timing {impl}")
        row = op_bench.bench_op(op, impl, shape, repeats=repeats, warmup=warmup,
                                peak_gflops=peaks.get(shape.dtype))
        if impl == "pallas":
          row["rel_error"] = error
          row["error"] = row["error"] or reason
        add(row, shape)
    for implementation in ("cudnn", "xla"):
      _stderr(f"T={shape.seq_len}: dot_product_attention ({implementation})")
      add(attention_row(implementation, shape, repeats=repeats, warmup=warmup), shape)
    _stderr(f"T={shape.seq_len}: flash-linear-attention")
    for row in fla_rows(shape, repeats=repeats, warmup=warmup):
      add(row, shape)

  print(format_table(rows, _MAX_ERROR.value))
  for line in target_lines(rows):
    print(line)
  wrong = [r for r in rows if r.get("rel_error") is not None and r["rel_error"] > _MAX_ERROR.value]
  print(f"wrote {json_path}")
  if wrong:
    raise SystemExit(f"{len(wrong)} kernel(s) disagree with the chunked form beyond "
                     f"--max_error={_MAX_ERROR.value}")


if __name__ == "__main__":
  app.run(main)
