"""What ``compute_classes.py`` does, without its flags: Languini's throughput
measurement, compute classes turned into step counts, one resumable run per
(preset, class), power-law fits and the report.

Protocol (Languini Kitchen, Stanić et al. 2023):

* **Throughput** of a run config is measured once per device: the full
  training step (forward, backward, optimizer update) on random tokens of the
  run's batch shape, median of timed steps after warm-up. It is stored in a
  CSV keyed by device, preset and batch shape, and read back afterwards.
* **A compute class** is a budget of device-hours ``h``. With the measured
  ``tokens/s`` and ``hour_seconds`` seconds per class hour (3600 on the real
  thing)::

      tokens = tokens/s · hour_seconds · h        steps = tokens // (batch · seq_len)

  The learning-rate schedule (warm-up, cosine) is fitted to ``steps``.
* **Scaling law**: per architecture (preset family), its best per-byte
  perplexity at each class (the best of its listed sizes), fitted as
  ``ppl_byte = a · h^b`` by least squares in log-log space. Two fits cross at
  ``h* = exp((ln a_ref − ln a) / (b − b_ref))``; beyond the largest class that
  is an extrapolation (Languini's GPT/qLSTM crossing: ~50,000 GPU hours).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np

from experiments import _tables
from experiments import evaluate_lib
from experiments.configs import common
from recurrent_lm import training
from recurrent_lm.models import presets
from recurrent_lm.training import throughput

THROUGHPUT_FIELDS = ("device", "preset", "vocab_size", "seq_len", "batch_size",
                     "seconds_per_step", "tokens_per_s", "params", "flops_per_token",
                     "warmup", "repeats")
RESULT_FIELDS = ("family", "preset", "class_hours", "device_seconds", "steps", "tokens",
                 "measured_tokens_per_s", "train_tokens_per_s", "params", "flops",
                 "token_perplexity", "byte_perplexity", "bits_per_byte", "eval_tokens")
SWEEP_FILE = "sweep.json"
RESULT_FILE = "result.json"
# Sweep fields a finished run does not depend on: more models or classes may
# be added to a work directory, its report compared with another family.
_FREE_FIELDS = ("models", "class_hours", "reference", "train")


def family(preset: str) -> str:
  """``gpt_small`` → ``gpt``; ``mamba2_cpu_small`` → ``mamba2``."""
  for size in sorted((*presets.SIZES, *presets.BASED_SIZES), key=len, reverse=True):
    if preset.endswith("_" + size):
      return preset[:-len(size) - 1]
  raise ValueError(f"preset {preset!r} has no known size suffix; expected <family>_<size>, "
                   f"one of {', '.join(presets.names())}")


def device_name() -> str:
  """``"cpu x1"``, ``"NVIDIA H100 80GB HBM3 x8"``: the kind and number of devices."""
  return f"{jax.devices()[0].device_kind} x{jax.device_count()}"


def check_sweep(sweep: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` with one line naming the first bad field."""
  if not sweep.models:
    raise ValueError("models is empty; expected at least one preset name")
  unknown = [m for m in sweep.models if m not in presets.names()]
  if unknown:
    raise ValueError(f"models has unknown preset {unknown[0]!r}; expected names of "
                     f"recurrent_lm.models.presets, e.g. gpt_cpu_small")
  for preset in sweep.models:
    family(preset)
  hours = list(sweep.class_hours)
  if not hours or any(not h > 0 for h in hours) or len(set(hours)) != len(hours):
    raise ValueError(f"class_hours={hours}; expected distinct positive device-hours")
  if not sweep.hour_seconds > 0:
    raise ValueError(f"hour_seconds={sweep.hour_seconds}; expected seconds > 0 per class hour")
  if sweep.reference not in {family(m) for m in sweep.models}:
    raise ValueError(f"reference={sweep.reference!r} is not the family of any model; expected "
                     f"one of {', '.join(sorted({family(m) for m in sweep.models}))}")


def run_config(sweep: ml_collections.ConfigDict, preset: str,
               steps: int) -> ml_collections.ConfigDict:
  """The training run of ``preset`` for ``steps`` steps under ``sweep``'s settings.

  Warm-up is ``min(optimizer.warmup_steps, steps // 10)`` (at least 1), so a
  short class still spends most of its steps at a useful learning rate.
  """
  config = common.run_config(preset, vocab_size=sweep.data.vocab_size,
                             seq_len=sweep.data.seq_len, batch_size=sweep.data.batch_size)
  config.data.update(corpus=sweep.data.corpus, data_dir=sweep.data.data_dir,
                     seed=sweep.data.seed)
  config.optimizer.update(sweep.optimizer.to_dict())
  config.optimizer.warmup_steps = max(1, min(sweep.optimizer.warmup_steps, steps // 10))
  config.mesh.update(sweep.mesh.to_dict())
  config.eval.update(sweep.eval.to_dict())
  config.train.update(sweep.train.to_dict())
  config.train.update(steps=steps, time_budget_s=0.0)
  return config


def check_workdir(sweep: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a work directory of a different sweep (or of something else);
  records this sweep's settings in a new one."""
  identity = {k: v for k, v in json.loads(sweep.to_json()).items() if k not in _FREE_FIELDS}
  path = os.path.join(workdir, SWEEP_FILE)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    for key in sorted(set(stored) | set(identity)):
      if stored.get(key) != identity.get(key):
        raise ValueError(f"workdir {workdir} holds a sweep with different {key} "
                         f"({stored.get(key)} -> {identity.get(key)}); use a new --workdir")
    return
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise ValueError(f"workdir {workdir} is not empty and holds no {SWEEP_FILE}; expected a "
                     "new or empty directory, or one of a previous compute-class sweep")
  os.makedirs(workdir, exist_ok=True)
  training.write_json_atomic(path, identity)


# ---------------------------------------------------------------------------
# Throughput: measured once per (device, preset, batch shape), then read back.


read_csv = _tables.read_csv
write_csv = _tables.write_csv


def _key(row) -> tuple[str, ...]:
  return tuple(str(row[k]) for k in ("device", "preset", "vocab_size", "seq_len", "batch_size"))


def throughput_row(sweep: ml_collections.ConfigDict, preset: str, csv_path: str,
                   device: str | None = None) -> dict:
  """The throughput of ``preset`` under ``sweep`` on this device: read from
  ``csv_path`` when it was measured before, else measured now and appended.

  Returns the row: ``tokens_per_s``, ``seconds_per_step``, ``params``,
  ``flops_per_token`` (floats and ints) and its key fields.
  """
  device = device or device_name()
  key = {"device": device, "preset": preset, "vocab_size": sweep.data.vocab_size,
         "seq_len": sweep.data.seq_len, "batch_size": sweep.data.batch_size}
  rows = read_csv(csv_path)
  for row in rows:
    if _key(row) == _key(key):
      return {**row, "tokens_per_s": float(row["tokens_per_s"]),
              "seconds_per_step": float(row["seconds_per_step"]), "params": int(row["params"]),
              "flops_per_token": float(row["flops_per_token"])}
  config = run_config(sweep, preset, 1000)
  seconds = training.step_seconds(config, warmup=sweep.throughput.warmup,
                                  repeats=sweep.throughput.repeats)
  params, flops = throughput.model_cost(training.model_config(config), sweep.data.seq_len)
  row = {**key, "seconds_per_step": seconds,
         "tokens_per_s": sweep.data.batch_size * sweep.data.seq_len / seconds,
         "params": params, "flops_per_token": flops,
         "warmup": sweep.throughput.warmup, "repeats": sweep.throughput.repeats}
  if jax.process_index() == 0:
    write_csv(csv_path, rows + [row], THROUGHPUT_FIELDS)
  return row


def class_budget(tokens_per_s: float, hours: float, hour_seconds: float, batch_size: int,
                 seq_len: int) -> tuple[int, int]:
  """``(tokens, steps)`` of a class of ``hours`` device-hours: Languini's
  ``steps = tokens/s · hours · hour_seconds // (batch · seq_len)`` (at least 1);
  ``tokens`` is what those steps train on."""
  steps = max(1, int(tokens_per_s * hours * hour_seconds // (batch_size * seq_len)))
  return steps * batch_size * seq_len, steps


# ---------------------------------------------------------------------------
# Runs.


def run_dir(workdir: str, preset: str, hours: float) -> str:
  return os.path.join(workdir, "runs", preset, f"{hours:g}h")


def run_cell(sweep: ml_collections.ConfigDict, preset: str, hours: float, measured: dict,
             workdir: str, progress: bool = True) -> dict:
  """Trains ``preset`` for the class of ``hours`` and scores its test split.

  A finished cell (its ``result.json`` exists) is read back; an interrupted
  one resumes from its newest checkpoint (``training.train``).
  """
  directory = run_dir(workdir, preset, hours)
  path = os.path.join(directory, RESULT_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  tokens, steps = class_budget(measured["tokens_per_s"], hours, sweep.hour_seconds,
                               sweep.data.batch_size, sweep.data.seq_len)
  summary = training.train(run_config(sweep, preset, steps), directory)
  metrics = evaluate_lib.evaluate(directory, progress=progress)
  result = {
      "family": family(preset), "preset": preset, "class_hours": hours,
      "device_seconds": hours * sweep.hour_seconds, "steps": steps, "tokens": tokens,
      "measured_tokens_per_s": measured["tokens_per_s"],
      "train_tokens_per_s": summary["tokens_per_s"], "params": summary["params"],
      "flops": summary["flops_per_token"] * tokens,
      "token_perplexity": metrics["token_perplexity"],
      "byte_perplexity": metrics["byte_perplexity"], "bits_per_byte": metrics["bits_per_byte"],
      "eval_tokens": metrics["tokens"],
  }
  if jax.process_index() == 0:
    training.write_json_atomic(path, result)
  return result


# ---------------------------------------------------------------------------
# Scaling laws.


def best_per_class(results: list[dict]) -> dict[str, list[dict]]:
  """family → its best run (lowest per-byte perplexity) at each class, by class."""
  best: dict[tuple[str, float], dict] = {}
  for r in results:
    key = (r["family"], float(r["class_hours"]))
    if key not in best or r["byte_perplexity"] < best[key]["byte_perplexity"]:
      best[key] = r
  out: dict[str, list[dict]] = {}
  for (name, _), r in sorted(best.items()):
    out.setdefault(name, []).append(r)
  return out


def fit_power_law(x, y) -> dict[str, float]:
  """Least squares of ``ln y = ln a + b ln x``: ``{"a", "b", "r2", "points"}``."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 2 or np.unique(x).size < 2:
    raise ValueError(f"{x.size} points at {np.unique(x).size} distinct compute values; "
                     "expected at least 2 distinct values to fit a power law")
  if np.any(x <= 0) or np.any(y <= 0):
    raise ValueError("a power law needs positive compute and perplexity values")
  lx, ly = np.log(x), np.log(y)
  b, ln_a = np.polyfit(lx, ly, 1)
  residual = ly - (ln_a + b * lx)
  total = np.sum((ly - ly.mean()) ** 2)
  r2 = 1.0 - float(np.sum(residual ** 2) / total) if total > 0 else 1.0
  return {"a": float(np.exp(ln_a)), "b": float(b), "r2": r2, "points": int(x.size)}


def crossing(fit: dict, reference: dict) -> float | None:
  """Compute ``h`` where ``a h^b = a_ref h^b_ref``; None for parallel fits."""
  if math.isclose(fit["b"], reference["b"], rel_tol=0.0, abs_tol=1e-12):
    return None
  return math.exp((math.log(reference["a"]) - math.log(fit["a"])) / (fit["b"] - reference["b"]))


def scaling(results: list[dict], reference: str) -> dict:
  """Fits per family and each family's crossing with ``reference``.

  Returns ``{"fits": {family: fit}, "crossings": {family: {"hours", "kind"}}}``;
  ``kind`` says where the crossing lies: ``"within"`` the measured classes,
  ``"extrapolated"`` beyond the largest, ``"before"`` the smallest (the
  family is already on the other side everywhere measured), ``"none"``
  (parallel fits) — and ``ahead`` whether the family beats the reference at
  the largest class.
  """
  best = best_per_class(results)
  fits = {}
  for name, runs in best.items():
    hours = [r["class_hours"] for r in runs]
    if len(set(hours)) >= 2:
      fits[name] = fit_power_law(hours, [r["byte_perplexity"] for r in runs])
  crossings = {}
  all_hours = [float(r["class_hours"]) for r in results]
  if reference in fits:
    top = max(all_hours)
    for name, fit in fits.items():
      if name == reference:
        continue
      hours = crossing(fit, fits[reference])
      if hours is None:
        kind = "none"
      elif hours > top:
        kind = "extrapolated"
      elif hours < min(all_hours):
        kind = "before"
      else:
        kind = "within"
      ahead = fit["a"] * top ** fit["b"] < fits[reference]["a"] * top ** fits[reference]["b"]
      crossings[name] = {"hours": hours, "kind": kind, "ahead_at_largest": bool(ahead)}
  return {"fits": fits, "crossings": crossings}


# ---------------------------------------------------------------------------
# Report: CSV, markdown, plot.


def _plot(results: list[dict], laws: dict, reference: str, path: str, unit: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  best = best_per_class(results)
  hours = [float(r["class_hours"]) for r in results]
  low, high = min(hours) / 1.5, max(hours) * 1.5
  crosses = [c["hours"] for c in laws["crossings"].values()
             if c["hours"] is not None and high < c["hours"] < 1e4 * max(hours)]
  high_fit = max([high] + [1.5 * c for c in crosses])
  fig, ax = plt.subplots(figsize=(7, 5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, (name, runs) in enumerate(sorted(best.items(), key=lambda kv: kv[0] != reference)):
    color = "black" if name == reference else colors[i % len(colors)]
    ax.plot([r["class_hours"] for r in runs], [r["byte_perplexity"] for r in runs], "o-",
            color=color, label=name)
    others = [r for r in results if r["family"] == name and r not in runs]
    if others:
      ax.plot([r["class_hours"] for r in others], [r["byte_perplexity"] for r in others], "x",
              color=color, alpha=0.5)
    if name in laws["fits"]:
      fit = laws["fits"][name]
      xs = np.geomspace(low, high_fit, 64)
      ax.plot(xs, fit["a"] * xs ** fit["b"], "--", color=color, alpha=0.7, linewidth=1)
  reference_fit = laws["fits"].get(reference)
  for name, cross in laws["crossings"].items():
    if cross["hours"] is not None and low < cross["hours"] <= high_fit:
      ax.plot([cross["hours"]], [reference_fit["a"] * cross["hours"] ** reference_fit["b"]],
              "*", color="gray", markersize=10)
  ax.set_xscale("log")
  ax.set_yscale("log")
  # Plain numbers on both axes; perplexities span less than a decade, so the
  # y axis labels its minor ticks too.
  ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  ax.set_xlabel(f"compute class (device-hours; 1 h = {unit})")
  ax.set_ylabel("test perplexity per byte")
  ax.set_title("Perplexity vs compute (dashed: power-law fits; ★: crossings)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_hours(value: float | None) -> str:
  return "—" if value is None else f"{value:,.3g}"


def write_report(results: list[dict], sweep: ml_collections.ConfigDict, workdir: str,
                 device: str) -> dict:
  """Writes ``results.csv``, ``fits.csv``, ``report.md`` and ``scaling.png`` into
  ``workdir``; returns the scaling fits and crossings."""
  results = sorted(results, key=lambda r: (r["family"] != sweep.reference, r["family"],
                                           r["preset"], r["class_hours"]))
  laws = scaling(results, sweep.reference)
  write_csv(os.path.join(workdir, "results.csv"), results, RESULT_FIELDS)
  fit_rows = [{"family": name, **fit, **{f"crossing_{k}": v for k, v in
                                         laws["crossings"].get(name, {}).items()}}
              for name, fit in laws["fits"].items()]
  write_csv(os.path.join(workdir, "fits.csv"), fit_rows,
            ("family", "a", "b", "r2", "points", "crossing_hours", "crossing_kind",
             "crossing_ahead_at_largest"))
  unit = (f"{sweep.hour_seconds:g} s of this device" if sweep.hour_seconds != 3600
          else "one hour")
  _plot(results, laws, sweep.reference, os.path.join(workdir, "scaling.png"), unit)

  lines = [
      "# Compute classes", "",
      f"Device: {device}. One class hour = {unit}. Data: {sweep.data.corpus} corpus, "
      f"vocabulary {sweep.data.vocab_size}, {sweep.data.batch_size} × {sweep.data.seq_len} "
      f"tokens a step. Test split, up to {sweep.eval.max_tokens or 'all'} tokens "
      "(per-byte perplexity = exp(NLL / UTF-8 bytes)).", "",
      "| family | preset | class (h) | params | tokens/s | steps | tokens | test ppl "
      "| ppl/byte | bits/byte |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    lines.append(f"| {r['family']} | {r['preset']} | {r['class_hours']:g} | {r['params']:,} "
                 f"| {r['measured_tokens_per_s']:,.0f} | {r['steps']:,} | {r['tokens']:,} "
                 f"| {r['token_perplexity']:.1f} | {r['byte_perplexity']:.3f} "
                 f"| {r['bits_per_byte']:.3f} |")
  lines += ["", f"Power-law fits `ppl_byte = a · h^b` (best preset per class) and the "
            f"crossing with the {sweep.reference} fit:", "",
            "| family | a | b | R² | points | crossing (h) | where | ahead at the largest class |",
            "|---|---:|---:|---:|---:|---:|---|---|"]
  for name, fit in laws["fits"].items():
    cross = laws["crossings"].get(name)
    where = cross["kind"] if cross else "reference" if name == sweep.reference else "—"
    ahead = ("yes" if cross["ahead_at_largest"] else "no") if cross else "—"
    lines.append(f"| {name} | {fit['a']:.4g} | {fit['b']:.4f} | {fit['r2']:.3f} "
                 f"| {fit['points']} | {format_hours(cross['hours'] if cross else None)} | {where} "
                 f"| {ahead} |")
  lines += ["", "![perplexity vs compute](scaling.png)", ""]
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return laws


# ---------------------------------------------------------------------------
# The sweep.


def run(sweep: ml_collections.ConfigDict, workdir: str, throughput_csv: str) -> dict:
  """Measures, trains and evaluates every (preset, class) of ``sweep`` in
  ``workdir`` (finished cells are read back); writes the report and returns
  :func:`scaling`'s fits and crossings."""
  check_sweep(sweep)
  check_workdir(sweep, workdir)
  device = device_name()
  measured = {}
  for preset in sweep.models:
    row = throughput_row(sweep, preset, throughput_csv, device)
    measured[preset] = row
    print(f"{preset:<20} {row['tokens_per_s']:>10,.0f} tokens/s  "
          f"({float(row['seconds_per_step']) * 1e3:.1f} ms a step, {device})", flush=True)
    jax.clear_caches()
  cells = [(p, h) for p in sweep.models for h in sweep.class_hours]
  results = []
  for i, (preset, hours) in enumerate(cells, 1):
    tokens, steps = class_budget(measured[preset]["tokens_per_s"], hours, sweep.hour_seconds,
                                 sweep.data.batch_size, sweep.data.seq_len)
    print(f"[{i}/{len(cells)}] {preset} at {hours:g} h: {steps:,} steps, {tokens:,} tokens",
          flush=True)
    start = time.perf_counter()
    result = run_cell(sweep, preset, hours, measured[preset], workdir)
    print(f"[{i}/{len(cells)}] {preset} at {hours:g} h: ppl {result['token_perplexity']:.1f}, "
          f"ppl/byte {result['byte_perplexity']:.3f} ({time.perf_counter() - start:.0f} s)",
          flush=True)
    results.append(result)
    jax.clear_caches()   # every run compiles its own step; keep the process's maps bounded
  laws = write_report(results, sweep, workdir, device)
  for name, cross in laws["crossings"].items():
    print(f"{name} vs {sweep.reference}: fits cross at {format_hours(cross['hours'])} h "
          f"({cross['kind']}); ahead at the largest class: {cross['ahead_at_largest']}")
  print(f"report: {os.path.join(workdir, 'report.md')}")
  return laws
