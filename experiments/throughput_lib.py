"""Throughput, memory and decode latency against sequence length: the logic of
``experiments/throughput.py``, free of flags so that tests can import it.

Every architecture runs at the ``cpu_small`` size (4 layers of width 128) next
to the reference Transformer ``gpt_cpu_small``, at every length ``T``, in three modes:

- ``train``: the full train step (forward, backward, AdamW update) on
  ``[B, T]`` random tokens; ``seconds`` per step, tokens/s ``= B·T / seconds``.
- ``prefill``: the forward pass over ``[B, T]`` tokens from a fresh state,
  returning the logits ``[B, T, V]`` and the state; tokens/s ``= B·T / seconds``.
- ``decode``: after an (untimed) ``inference.prefill`` of a ``T``-token context,
  greedy single-token steps of ``inference.decode_step``
  ``(params, state, token [B]) -> (next token [B], state)``;
  ``seconds`` per token (the median), tokens/s ``= B / seconds``.

The model of a cell is its preset at ``max_len`` = the tokens it must hold:
``T`` for train and prefill, ``T + warmup + decode_tokens`` for decode, so the
GPT's KV cache is sized to the context as a serving system would size it and
its per-token cost grows with the context, while a recurrent state does not.

``peak_bytes`` is XLA's buffer-assignment figure of the compiled function
(``compiled.memory_analysis()``)::

    peak = argument + output − alias + temp        (bytes)

read before running: a cell whose peak is over the memory limit is not run.
``state_bytes`` is ``models.state_bytes(config, B)``: KV caches at capacity.

``long_decode`` (not a mode of the sweep) decodes ``N`` tokens (100,000 by
default) from one preset after a short prompt and samples, every ``every``
tokens, the elapsed seconds, the process's resident memory (RSS), the
device's ``bytes_in_use`` where it reports one, and the state's bytes: a
recurrent state of fixed size should keep all of them but the time flat.

A crossover length is where a recurrent model's tokens/s overtakes the GPT's:
with ``r(T) = tokens/s(T) / tokens/s_gpt(T)`` at the lengths both were
measured, between the first consecutive ``T₁ < T₂`` with ``r₁ < 1 ≤ r₂``::

    log T* = log T₁ + (−log r₁) · (log T₂ − log T₁) / (log r₂ − log r₁)
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from typing import Callable, Mapping, Sequence
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import psutil

from experiments import _tables
from recurrent_lm import inference
from recurrent_lm import models
from recurrent_lm import training
from recurrent_lm.training import step as step_lib
from recurrent_lm.training import throughput

MODES = ("train", "prefill", "decode")
REFERENCE = "gpt"
SIZE = "cpu_small"
FIELDS = ("device", "preset", "mode", "seq_len", "batch_size", "vocab_size", "seconds",
          "tokens_per_s", "peak_bytes", "state_bytes", "status")
KEY_FIELDS = ("device", "preset", "mode", "seq_len", "batch_size", "vocab_size")
CSV_NAME = "throughput.csv"
OK = "ok"
_GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Settings:
  """How every cell is measured (the script's flags)."""
  batch_size: int = 1
  vocab_size: int = 4096
  warmup: int = 1
  repeats: int = 3
  decode_tokens: int = 64
  memory_limit_gib: float = 16.0
  time_limit_s: float = 30.0


def preset_name(family: str) -> str:
  """``qlstm`` → ``qlstm_cpu_small``."""
  return f"{family}_{SIZE}"


def families_with_reference(families: Sequence[str]) -> list[str]:
  """``families`` without repeats, the reference GPT first (added when missing)."""
  return [REFERENCE] + [f for f in dict.fromkeys(families) if f != REFERENCE]


def check_settings(families: Sequence[str], lengths: Sequence[int], modes: Sequence[str],
                   settings: Settings) -> None:
  """Raises ``ValueError`` with one line naming the first bad value."""
  allowed = sorted(n[:-len(SIZE) - 1] for n in models.presets.names() if n.endswith("_" + SIZE))
  for family in families:
    if family not in allowed:
      raise ValueError(f"unknown preset family {family!r}; expected some of "
                       f"{', '.join(allowed)} (the {SIZE} presets)")
  if not lengths or any(t < 1 for t in lengths):
    raise ValueError(f"lengths={list(lengths)}; expected positive ints")
  if not modes or any(m not in MODES for m in modes):
    raise ValueError(f"modes={list(modes)}; expected some of {', '.join(MODES)}")
  for name in ("batch_size", "vocab_size", "repeats", "decode_tokens"):
    if getattr(settings, name) < 1:
      raise ValueError(f"{name}={getattr(settings, name)}; expected a positive int")
  if settings.warmup < 0:
    raise ValueError(f"warmup={settings.warmup}; expected an int >= 0")
  for name in ("memory_limit_gib", "time_limit_s"):
    if not getattr(settings, name) > 0:
      raise ValueError(f"{name}={getattr(settings, name)}; expected a number > 0")


def peak_bytes(stats) -> int:
  """XLA's peak bytes of a compiled function from its ``memory_analysis()``:
  ``argument + output − alias + temp``."""
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


# ---------------------------------------------------------------------------
# The CSV: one row per (device, preset, mode, seq_len, batch_size, vocab_size).


def row_key(row: Mapping) -> tuple[str, ...]:
  return tuple(str(row[k]) for k in KEY_FIELDS)


def read_rows(path: str) -> list[dict[str, str]]:
  """The rows of ``path`` as strings; ``[]`` when it does not exist."""
  rows = _tables.read_csv(path)
  if rows and set(KEY_FIELDS) - set(rows[0]):
    raise ValueError(f"{path} has columns {sorted(rows[0])}; expected {', '.join(FIELDS)}")
  return rows


def write_rows(path: str, rows: Sequence[Mapping]) -> None:
  """Writes ``rows`` to ``path`` atomically (a crash leaves the old file)."""
  _tables.write_csv(path, rows, FIELDS)


def reusable(row: Mapping, memory_limit_gib: float) -> bool:
  """Whether a stored row stands for this run: a measurement, or a memory skip
  whose need is still over the limit. Time-limit skips are decided afresh
  (from the reused measurements before them) and failures are retried."""
  if row["status"] == OK:
    return True
  return row["status"].startswith("skipped: needs") and bool(row["peak_bytes"]) and (
      float(row["peak_bytes"]) > memory_limit_gib * _GIB)


def _number(row: Mapping, field: str) -> float | None:
  value = row.get(field, "")
  return None if value in ("", None) else float(value)


def _series(rows: Sequence[Mapping], preset: str, mode: str,
            field: str = "tokens_per_s") -> dict[int, float]:
  """``{seq_len: field}`` of the measured (``ok``) rows of ``preset`` in ``mode``."""
  return {int(r["seq_len"]): float(r[field]) for r in rows
          if r["preset"] == preset and r["mode"] == mode and r["status"] == OK}


# ---------------------------------------------------------------------------
# Crossovers and decode flatness.


def crossover(reference: Mapping[int, float], other: Mapping[int, float]) -> dict:
  """Where ``other``'s tokens/s overtakes ``reference``'s (module docstring).

  Args:
    reference: ``{T: tokens/s}`` of the GPT at the lengths it was measured.
    other: ``{T: tokens/s}`` of a recurrent model.

  Returns:
    ``{"bound", "length", "text", "reference_missing"}``: ``bound`` ``"="``
    with the interpolated ``length`` T*; ``"<="`` with the shortest common
    length when ``other`` is already as fast there; ``">"`` with the longest
    common length when it never overtakes; None (and ``length`` None) without a
    common length. ``reference_missing`` lists the lengths ``other`` was
    measured at and the reference was not (e.g. over the memory limit).
  """
  common = sorted(set(reference) & set(other))
  missing = sorted(set(other) - set(reference))
  note = (f" (gpt not measured at {', '.join(str(t) for t in missing)})" if missing else "")
  result = {"bound": None, "length": None, "reference_missing": missing}
  if not common:
    return {**result, "text": "no common length" + note}
  log_ratio = [math.log(other[t] / reference[t]) for t in common]
  if log_ratio[0] >= 0:
    return {**result, "bound": "<=", "length": common[0],
            "text": f"<= {common[0]}{note}"}
  for (t1, r1), (t2, r2) in zip(zip(common, log_ratio), zip(common[1:], log_ratio[1:])):
    if r1 < 0 <= r2:
      log_t = math.log(t1) - r1 * (math.log(t2) - math.log(t1)) / (r2 - r1)
      length = math.exp(log_t)
      return {**result, "bound": "=", "length": length, "text": f"{length:,.0f}{note}"}
  return {**result, "bound": ">", "length": common[-1], "text": f"> {common[-1]}{note}"}


def crossovers(rows: Sequence[Mapping], presets: Sequence[str]) -> dict[str, dict[str, dict]]:
  """``{mode: {preset: crossover(...)}}`` for ``train`` and ``prefill`` against the
  GPT, for every preset but the GPT, from the measured rows."""
  reference = preset_name(REFERENCE)
  return {mode: {p: crossover(_series(rows, reference, mode), _series(rows, p, mode))
                 for p in presets if p != reference}
          for mode in ("train", "prefill")}


def decode_flatness(rows: Sequence[Mapping], presets: Sequence[str]) -> dict[str, dict]:
  """Per preset: seconds per decoded token at the shortest and the longest
  measured context and their ratio (≈ 1: flat in the context length)."""
  result = {}
  for preset in presets:
    seconds = _series(rows, preset, "decode", "seconds")
    if not seconds:
      continue
    short, long = min(seconds), max(seconds)
    result[preset] = {"shortest": short, "longest": long, "ms_shortest": 1e3 * seconds[short],
                      "ms_longest": 1e3 * seconds[long], "ratio": seconds[long] / seconds[short]}
  return result


# ---------------------------------------------------------------------------
# Measuring one cell.


def _compile(fn, *args):
  """``(compiled fn, peak bytes)``."""
  compiled = fn.lower(*args).compile()
  return compiled, peak_bytes(compiled.memory_analysis())


def _skip(needed: int, settings: Settings) -> str | None:
  if needed > settings.memory_limit_gib * _GIB:
    return (f"skipped: needs {needed / _GIB:.2f} GiB > limit {settings.memory_limit_gib:g} GiB")
  return None


# Initialisation is jitted: run eagerly, its hundreds of small ops would each
# compile again after every jax.clear_caches().
def _params(model, tokens):
  init = jax.jit(lambda x: nn.meta.unbox(model.init(jax.random.PRNGKey(0), x)["params"]))
  return init(tokens[:, :1])


def train_cell(model, tokens, settings: Settings) -> dict:
  """The full train step (forward, backward, AdamW) of ``model`` on ``tokens``
  ``[B, T + 1]`` (inputs and shifted targets): compiled, then timed as the median
  of ``settings.repeats`` after ``settings.warmup`` untimed steps.

  Returns ``{"seconds", "peak_bytes", "status", "cost_s"}`` (only ``peak_bytes``
  and a ``skipped`` status when the compiled step is over the memory limit).
  """
  optimizer = optax.adamw(1e-3)
  state = jax.jit(lambda: nn.meta.unbox(step_lib.init_state(model, optimizer, (1, 1), seed=0)))()
  batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
           "segment_ids": jnp.ones(tokens[:, 1:].shape, jnp.int32)}
  step = jax.jit(step_lib.make_train_step(model, optimizer), donate_argnums=0)
  step, peak = _compile(step, state, batch)
  status = _skip(peak, settings)
  if status:
    return {"peak_bytes": peak, "status": status}
  seconds = throughput.step_seconds(step, state, batch, warmup=settings.warmup,
                                    repeats=settings.repeats)
  return {"seconds": seconds, "peak_bytes": peak, "status": OK, "cost_s": seconds}


def _prefill(model, tokens, settings: Settings) -> dict:
  """``logits [B, T, V], state = model(tokens[:, :T])`` from a fresh state."""
  # state=None is the fresh state of init_state(B), and lets attention take
  # its no-cache path (the cache is filled afterwards) instead of attending
  # over an empty cache of capacity T beside the T new keys.
  tokens = jnp.asarray(tokens[:, :-1])
  params = _params(model, tokens)
  prefill, peak = _compile(jax.jit(lambda p, x: model.apply({"params": p}, x)), params, tokens)
  status = _skip(peak, settings)
  if status:
    return {"peak_bytes": peak, "status": status}
  # step_seconds times step(state, batch) -> (state, outputs): params ride as the state.
  seconds = throughput.step_seconds(lambda p, x: (p, prefill(p, x)), params, tokens,
                                    warmup=settings.warmup, repeats=settings.repeats)
  return {"seconds": seconds, "peak_bytes": peak, "status": OK, "cost_s": seconds}


def _decode(model, tokens, settings: Settings) -> dict:
  """Prefill ``tokens[:, :T]`` with ``inference.prefill`` (untimed, but its wall
  time is the cell's cost), then time ``inference.decode_step``: single greedy
  tokens ``[B] -> [B]`` carrying the (donated) state.

  Both are compiled ahead of the run with the arguments they are then called
  with, so the calls reuse those executables, and XLA's peak memory is read
  from them first: over the memory limit, nothing runs.

  Returns ``{"seconds", "peak_bytes", "status", "cost_s"}``: the median
  seconds per token and the decode step's peak (only ``peak_bytes`` and a
  ``skipped`` status, the larger of both peaks, when over the limit).
  """
  context = jnp.asarray(tokens[:, :-1])
  segment_ids = jnp.full(context.shape, inference.PROMPT_SEGMENT, jnp.int32)
  params = _params(model, context)
  key, sampling = jax.random.key(0), inference.GREEDY     # greedy: the key is unused
  token, state = jax.eval_shape(inference.prefill, model, params, context, segment_ids, key,
                                sampling)
  _, prefill_peak = _compile(inference.prefill, model, params, context, segment_ids, key,
                             sampling)
  _, peak = _compile(inference.decode_step, model, params, state, token, key, sampling)
  status = _skip(max(peak, prefill_peak), settings)
  if status:
    return {"peak_bytes": max(peak, prefill_peak), "status": status}
  start = time.perf_counter()
  token, state = jax.block_until_ready(
      inference.prefill(model, params, context, segment_ids, key, sampling))
  prefill_seconds = time.perf_counter() - start
  for _ in range(settings.warmup):
    token, state = inference.decode_step(model, params, state, token, key, sampling)
  jax.block_until_ready((token, state))
  times = []
  for _ in range(settings.decode_tokens):
    start = time.perf_counter()
    token, state = jax.block_until_ready(
        inference.decode_step(model, params, state, token, key, sampling))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"seconds": seconds, "peak_bytes": peak, "status": OK,
          "cost_s": max(seconds, prefill_seconds)}


def max_len(mode: str, seq_len: int, settings: Settings) -> int:
  """Tokens the model of a cell must hold: the context, and in ``decode`` the
  warm-up and timed tokens after it."""
  return seq_len + (settings.warmup + settings.decode_tokens if mode == "decode" else 0)


def measure(family: str, mode: str, seq_len: int, settings: Settings, device: str) -> dict:
  """One row (``FIELDS``) of ``family``'s preset in ``mode`` at ``seq_len``, and
  ``cost_s``: the longest single call it made (seconds), for the time limit.

  Runtime failures of the device (e.g. out of memory) give a ``failed: …`` row.
  """
  config = models.presets.get(preset_name(family), vocab_size=settings.vocab_size,
                              max_len=max_len(mode, seq_len, settings))
  model = models.build(config)
  rng = np.random.default_rng(seq_len)
  tokens = rng.integers(0, settings.vocab_size, (settings.batch_size, seq_len + 1), np.int32)
  row = {"device": device, "preset": preset_name(family), "mode": mode, "seq_len": seq_len,
         "batch_size": settings.batch_size, "vocab_size": settings.vocab_size,
         "state_bytes": models.state_bytes(config, settings.batch_size)}
  with warnings.catch_warnings():
    # Buffers XLA cannot alias (e.g. the step counter) are copied instead: harmless.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    try:
      row.update({"train": train_cell, "prefill": _prefill, "decode": _decode}[mode](
          model, tokens, settings))
    except jax.errors.JaxRuntimeError as error:
      row["status"] = "failed: " + str(error).strip().splitlines()[0][:200]
  if row["status"] == OK:
    tokens_per_step = settings.batch_size * (1 if mode == "decode" else seq_len)
    row["tokens_per_s"] = tokens_per_step / row["seconds"]
  return row


# ---------------------------------------------------------------------------
# Plots.


def _axes_log(ax, xlabel: str, ylabel: str, title: str, logy: bool = True) -> None:
  import matplotlib.ticker
  ax.set_xscale("log", base=2)
  if logy:
    ax.set_yscale("log")
  ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
      lambda x, _: f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)


def _lines(ax, rows, presets, mode, field, scale=1.0, title=""):
  """One line per preset of ``field`` against T; the GPT in black."""
  import matplotlib.pyplot as plt
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  drawn = False
  for i, preset in enumerate(presets):
    series = (_series(rows, preset, mode, field) if field != "state_bytes" else
              {int(r["seq_len"]): float(r["state_bytes"]) for r in rows
               if r["preset"] == preset and r["mode"] == mode and r["state_bytes"] != ""})
    if not series:
      continue
    lengths = sorted(series)
    reference = preset == preset_name(REFERENCE)
    ax.plot(lengths, [scale * series[t] for t in lengths], "o-", markersize=3,
            color="black" if reference else colors[i % len(colors)],
            linewidth=2 if reference else 1.2, label=preset.removesuffix("_" + SIZE))
    drawn = True
  if drawn:
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, f"{mode}: nothing measured", ha="center", va="center",
            transform=ax.transAxes)


def write_plots(rows: Sequence[Mapping], presets: Sequence[str], out: str, title: str) -> None:
  """``throughput.png``, ``decode_latency.png`` and ``memory.png`` in ``out``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  for ax, mode in zip(axes, ("train", "prefill")):
    _lines(ax, rows, presets, mode, "tokens_per_s")
    _axes_log(ax, "sequence length T", "tokens / s", f"{mode} throughput")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "throughput.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7, 4.8))
  _lines(ax, rows, presets, "decode", "seconds", scale=1e3)
  _axes_log(ax, "context length T", "ms per decoded token",
            f"decode latency per token (median)\n{title}", logy=False)
  ax.set_ylim(bottom=0)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "decode_latency.png"), dpi=110)
  plt.close(fig)

  state_mode = next((m for m in ("prefill", "train", "decode")
                     if any(r["mode"] == m for r in rows)), "prefill")
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
  _lines(axes[0], rows, presets, "train", "peak_bytes", scale=1 / 2 ** 20)
  _axes_log(axes[0], "sequence length T", "MiB", "peak training memory (XLA buffer assignment)")
  _lines(axes[1], rows, presets, state_mode, "state_bytes")
  _axes_log(axes[1], "capacity T", "bytes per sequence",
            "state bytes: KV cache (gpt) vs recurrent state")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "memory.png"), dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------
# The sweep.


def _format_row(row: Mapping, note: str = "") -> str:
  """preset, mode, T, tokens/s, ms (per step, or per token in decode), peak MiB,
  state bytes, status: ``-`` where not measured."""
  def cell(field, scale, fmt):
    value = _number(row, field)
    return "-" if value is None else format(scale * value, fmt)
  return (f"{row['preset']:<20} {row['mode']:<8} {int(row['seq_len']):>6} "
          f"{cell('tokens_per_s', 1, ',.0f'):>10} {cell('seconds', 1e3, ',.2f'):>10} "
          f"{cell('peak_bytes', 2 ** -20, ',.1f'):>10} "
          f"{int(row['state_bytes']):>12,} {row['status']}{note}")


def summarize(rows: Sequence[Mapping], presets: Sequence[str],
              print_fn: Callable[[str], None] = print) -> dict:
  """Prints the crossover table and decode flatness; returns them (``crossovers.json``)."""
  crosses = crossovers(rows, presets)
  flat = decode_flatness(rows, presets)
  others = [p for p in presets if p != preset_name(REFERENCE)]
  if others:
    print_fn("\ncrossover length: where tokens/s overtakes gpt_cpu_small's "
             "(log-log interpolation)")
    print_fn(f"{'preset':<20} {'train':<28} {'prefill':<28}")
    for preset in others:
      print_fn(f"{preset:<20} {crosses['train'][preset]['text']:<28} "
               f"{crosses['prefill'][preset]['text']:<28}")
  if flat:
    print_fn("\ndecode latency per token, longest vs shortest context "
             "(ratio ≈ 1: flat in the context)")
    print_fn(f"{'preset':<20} {'context':>15} {'ms/token':>17} {'ratio':>7}")
    for preset, f in flat.items():
      print_fn(f"{preset:<20} {f['shortest']:>6} -> {f['longest']:<6} "
               f"{f['ms_shortest']:>7.2f} -> {f['ms_longest']:<7.2f} {f['ratio']:>7.2f}")
  return {"reference": preset_name(REFERENCE), "crossovers": crosses, "decode_latency": flat}


def _stored_cost(stored: Mapping[tuple, Mapping], row: Mapping) -> float | None:
  """The longest call of a stored measurement: its step, or for ``decode`` the
  prefill of its context when that was measured (else its per-token step)."""
  cost = _number(row, "seconds")
  if row["mode"] == "decode":
    prefill = stored.get(row_key({**row, "mode": "prefill"}))
    if prefill is not None and prefill["status"] == OK:
      cost = max(cost, float(prefill["seconds"]))
  return cost


def run(families: Sequence[str], lengths: Sequence[int], modes: Sequence[str],
        settings: Settings, out: str, print_fn: Callable[[str], None] = print) -> dict:
  """Measures every (preset, length, mode) missing from ``out/throughput.csv``
  and writes the CSV (after each measurement), the plots and ``crossovers.json``.

  Returns:
    ``{"rows": this run's rows, "measured": n, "reused": n, "summary": ...}``.
  """
  families = families_with_reference(families)
  lengths = sorted(set(lengths))
  modes = [m for m in MODES if m in modes]
  check_settings(families, lengths, modes, settings)
  os.makedirs(out, exist_ok=True)
  csv_path = os.path.join(out, CSV_NAME)
  stored = {row_key(r): r for r in read_rows(csv_path)}
  device = jax.devices()[0].device_kind
  presets = [preset_name(f) for f in families]

  peak = throughput.matmul_peak_flops()
  print_fn(f"device {device}, matmul peak {peak / 1e9:.1f} GFLOP/s; batch {settings.batch_size}, "
           f"vocab {settings.vocab_size}, median of {settings.repeats} after {settings.warmup} "
           f"warm-up ({settings.decode_tokens} decoded tokens per context); limits "
           f"{settings.memory_limit_gib:g} GiB, {settings.time_limit_s:g} s per step")
  print_fn(f"{'preset':<20} {'mode':<8} {'T':>6} {'tokens/s':>10} {'ms':>10} {'peak MiB':>10} "
           f"{'state bytes':>12} status")
  rows, measured, reused = [], 0, 0
  too_slow: dict[tuple[str, str], str] = {}
  for family in families:
    for seq_len in lengths:
      for mode in modes:
        preset = preset_name(family)
        key = row_key({"device": device, "preset": preset, "mode": mode, "seq_len": seq_len,
                       "batch_size": settings.batch_size, "vocab_size": settings.vocab_size})
        old = stored.get(key)
        if old is not None and reusable(old, settings.memory_limit_gib):
          row, note, cost = old, " (from csv)", _stored_cost(stored, old)
          reused += 1
        elif (preset, mode) in too_slow:
          config = models.presets.get(preset, vocab_size=settings.vocab_size,
                                      max_len=max_len(mode, seq_len, settings))
          row = dict(zip(KEY_FIELDS, key), status=too_slow[(preset, mode)],
                     state_bytes=models.state_bytes(config, settings.batch_size))
          note, cost = "", None
        else:
          row = measure(family, mode, seq_len, settings, device)
          note, cost = "", row.pop("cost_s", None)
          measured += 1
        row = {k: str(row.get(k, "")) for k in FIELDS}
        if row["status"] == OK and cost is not None and cost > settings.time_limit_s:
          too_slow[(preset, mode)] = (f"skipped: {mode} at T={seq_len} took {cost:.1f} s "
                                      f"per call > time limit {settings.time_limit_s:g} s")
        rows.append(row)
        stored[key] = row
        write_rows(csv_path, list(stored.values()))
        print_fn(_format_row(row, note))
      jax.clear_caches()

  print_fn(f"\n{measured} measured, {reused} reused from {csv_path}")
  title = f"{device}, batch {settings.batch_size}, vocab {settings.vocab_size}, 4 layers x 128"
  write_plots(rows, presets, out, title)
  summary = summarize(rows, presets, print_fn)
  training.write_json_atomic(os.path.join(out, "crossovers.json"),
                             {"device": device, "batch_size": settings.batch_size,
                              "vocab_size": settings.vocab_size, "lengths": lengths, **summary})
  return {"rows": rows, "measured": measured, "reused": reused, "summary": summary}


# ---------------------------------------------------------------------------
# Long decode: memory over a long generation.

LONG_DECODE = "long_decode"
LONG_DECODE_PRESET = "qlstm_cpu_small"
LONG_DECODE_CSV = "long_decode.csv"
LONG_DECODE_FIELDS = ("device", "preset", "tokens", "seconds", "ms_per_token", "rss_bytes",
                      "device_bytes_in_use", "state_bytes")
PROMPT_LEN = 16
_MIB = 2 ** 20


def split_modes(modes: Sequence[str]) -> tuple[list[str], bool]:
  """``(modes of the sweep in MODES order, whether long_decode is asked for)``;
  raises ``ValueError`` with one line on an unknown mode."""
  if not modes or any(m not in MODES + (LONG_DECODE,) for m in modes):
    raise ValueError(f"modes={list(modes)}; expected some of "
                     f"{', '.join(MODES + (LONG_DECODE,))}")
  return [m for m in MODES if m in modes], LONG_DECODE in modes


def check_long_decode(preset: str, tokens: int, every: int, batch_size: int = 1,
                      vocab_size: int = 4096, prompt_len: int = PROMPT_LEN) -> None:
  """Raises ``ValueError`` with one line naming the first bad value of :func:`long_decode`."""
  if preset not in models.presets.names():
    raise ValueError(f"unknown long_decode_preset {preset!r}; expected a preset name such as "
                     f"{LONG_DECODE_PRESET} (models.presets.names())")
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"long_decode_every={every!r}; expected a positive int "
                     "(decoded tokens between samples)")
  if not isinstance(tokens, int) or tokens < every:
    raise ValueError(f"long_decode_tokens={tokens!r}; expected an int >= "
                     f"long_decode_every={every} (one sample at least)")
  for name, value in (("batch_size", batch_size), ("vocab_size", vocab_size),
                      ("prompt_len", prompt_len)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}; expected a positive int")


def tree_bytes(tree) -> int:
  """Bytes of the arrays of ``tree`` (the sum of their ``nbytes``)."""
  return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


def _device_bytes_in_use() -> int | None:
  """``bytes_in_use`` of the first device's allocator; None where it reports
  none (the CPU backend's ``memory_stats()`` is None)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("bytes_in_use")


def rss_growth_mib(rows: Sequence[Mapping]) -> float | None:
  """Resident memory of the last sample minus the first's (MiB); None with one
  sample. The first sample comes after ``every`` tokens, past the warm-up."""
  if len(rows) < 2:
    return None
  return (float(rows[-1]["rss_bytes"]) - float(rows[0]["rss_bytes"])) / _MIB


def _format_long_row(row: Mapping) -> str:
  in_use = row["device_bytes_in_use"]
  device_mib = "-" if in_use in (None, "") else f"{float(in_use) / _MIB:,.1f}"
  return (f"{row['tokens']:>9,} {row['seconds']:>9.2f} {row['ms_per_token']:>9.3f} "
          f"{row['rss_bytes'] / _MIB:>9.1f} {device_mib:>10} {row['state_bytes']:>12,}")


def long_decode(preset: str = LONG_DECODE_PRESET, tokens: int = 100_000, every: int = 10_000,
                out: str | None = None, *, batch_size: int = 1, vocab_size: int = 4096,
                prompt_len: int = PROMPT_LEN,
                print_fn: Callable[[str], None] = print) -> list[dict]:
  """Decodes ``tokens`` greedy tokens of ``preset`` after a random prompt and
  samples the memory every ``every`` tokens.

  ``inference.prefill`` reads the prompt ``[B, prompt_len]``, then
  ``inference.decode_step`` is called ``tokens`` times, each token read back to
  the host as a streaming generator would; only their count is kept. The
  decode step is compiled before the clock starts. The model's ``max_len`` is
  ``prompt_len + tokens`` (the capacity a GPT's KV cache would need).

  Args:
    preset: a name of ``models.presets.names()``.
    tokens: decode steps in all (≥ ``every``).
    every: decode steps between samples (≥ 1); the last step is sampled too.
    out: the directory of ``long_decode.csv`` (rewritten after every sample);
      None writes nothing.
    batch_size: rows ``B`` decoded together.
    vocab_size: the model's vocabulary.
    prompt_len: tokens of the random prompt.
    print_fn: where the table goes.

  Returns:
    One dict per sample (``LONG_DECODE_FIELDS``): ``tokens`` decoded so far,
    ``seconds`` since decoding began, ``ms_per_token`` over the last interval,
    ``rss_bytes`` of this process, ``device_bytes_in_use`` (None where the
    device reports none) and ``state_bytes``, the nbytes of the state's leaves.
  """
  check_long_decode(preset, tokens, every, batch_size, vocab_size, prompt_len)
  config = models.presets.get(preset, vocab_size=vocab_size, max_len=prompt_len + tokens)
  model = models.build(config)
  rng = np.random.default_rng(0)
  prompt = jnp.asarray(rng.integers(0, vocab_size, (batch_size, prompt_len), np.int32))
  segment_ids = jnp.full(prompt.shape, inference.PROMPT_SEGMENT, jnp.int32)
  params = _params(model, prompt)
  key, sampling = jax.random.key(0), inference.GREEDY     # greedy: the key is unused
  token, state = jax.block_until_ready(
      inference.prefill(model, params, prompt, segment_ids, key, sampling))
  # Compiled here, so that the first call below reuses it instead of compiling.
  inference.decode_step.lower(model, params, state, token, key, sampling).compile()
  device = jax.devices()[0].device_kind
  csv_path = None if out is None else os.path.join(out, LONG_DECODE_CSV)
  process = psutil.Process()
  print_fn(f"\nlong decode: {preset}, {tokens:,} tokens after a {prompt_len}-token prompt, "
           f"batch {batch_size}, vocab {vocab_size}, on {device}; "
           f"RSS before decoding {process.memory_info().rss / _MIB:,.1f} MiB")
  print_fn(f"{'tokens':>9} {'seconds':>9} {'ms/token':>9} {'RSS MiB':>9} {'device MiB':>10} "
           f"{'state bytes':>12}")
  rows: list[dict] = []
  decoded, previous = 0, (0, 0.0)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    start = time.perf_counter()
    while decoded < tokens:
      token, state = inference.decode_step(model, params, state, token, key, sampling)
      np.asarray(token)          # read back (and waited for); not kept
      decoded += 1
      if decoded % every and decoded != tokens:
        continue
      seconds = time.perf_counter() - start
      row = {"device": device, "preset": preset, "tokens": decoded, "seconds": seconds,
             "ms_per_token": 1e3 * (seconds - previous[1]) / (decoded - previous[0]),
             "rss_bytes": process.memory_info().rss,
             "device_bytes_in_use": _device_bytes_in_use(), "state_bytes": tree_bytes(state)}
      rows.append(row)
      previous = (decoded, seconds)
      if csv_path is not None:
        _tables.write_csv(csv_path, rows, LONG_DECODE_FIELDS)
      print_fn(_format_long_row(row))
  growth = rss_growth_mib(rows)
  sizes = sorted({r["state_bytes"] for r in rows})
  print_fn("rss growth " + ("- (one sample)" if growth is None else
                            f"{growth:+,.1f} MiB from {rows[0]['tokens']:,} to "
                            f"{rows[-1]['tokens']:,} tokens (last - first sample)")
           + "; state bytes " + (f"constant at {sizes[0]:,}" if len(sizes) == 1 else
                                 f"varied: {', '.join(f'{b:,}' for b in sizes)}"))
  return rows
