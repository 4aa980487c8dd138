"""What ``recall_sweep`` and ``jrt_eval`` share: the grid's models, the task sources,
training and evaluating a cell, the tables and the plots (no flags; the scripts
own those)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from recurrent_lm import models
from recurrent_lm.data import synthetic
from recurrent_lm.evaluation import recall
from recurrent_lm.models import lm
from recurrent_lm.training import tasks

# arch → (mixer, the kwarg its state-size knob sets, fixed kwargs). The knob:
#   based/jrt: Taylor feature dim d′ (state ∝ d′²); mamba/mamba2: d_state N;
#   gla/mlstm: number of heads (state = K·V / heads: fewer heads, more state);
#   qlstm: cells per head (4 heads); linear_attention: head dim.
ARCHS = {
    "attention": ("attention", None, {"num_heads": 1}),
    "based": ("based", "feature_dim", {"num_heads": 1}),
    "jrt": ("jrt", "feature_dim", {"num_heads": 1}),
    "linear_attention": ("linear_attention", "head_dim", {"num_heads": 1}),
    "mamba": ("mamba", "d_state", {}),
    "mamba2": ("mamba2", "d_state", {"head_dim": 16}),
    "gla": ("gla", "num_heads", {}),
    "mlstm": ("mlstm", "num_heads", {}),
    "qlstm": ("qlstm", "head_dim", {"num_heads": 4}),
}
RESULT = "result.json"


@dataclasses.dataclass(frozen=True)
class Model:
  """A grid entry: ``arch:d_model:knob``."""
  arch: str
  d_model: int
  knob: int

  @classmethod
  def parse(cls, entry: str) -> "Model":
    parts = entry.split(":")
    if len(parts) != 3 or parts[0] not in ARCHS or not all(p.isdigit() for p in parts[1:]):
      raise ValueError(f"grid entry {entry!r}; expected arch:d_model:knob with arch one of "
                       f"{', '.join(ARCHS)}")
    return cls(parts[0], int(parts[1]), int(parts[2]))

  @property
  def name(self) -> str:
    knob = ARCHS[self.arch][1]
    return f"{self.arch}-d{self.d_model}" + (f"-{knob}{self.knob}" if knob else "")


def model_config(model: Model, vocab_size: int, num_layers: int, max_len: int) -> lm.ModelConfig:
  """Zoology's recall model: ``num_layers`` × (short conv, mixer), no MLP, RMSNorm."""
  mixer, knob, fixed = ARCHS[model.arch]
  kwargs = dict(fixed)
  if knob:
    kwargs[knob] = model.knob
  if mixer == "attention":
    kwargs["max_len"] = max_len
  if mixer == "jrt":
    kwargs["prefix_len"] = 1   # set per task setting by tasks.for_context
  conv = lm.MixerSpec("base_conv", (("expand", 1), ("kernel_size", 3)))
  return lm.ModelConfig(vocab_size=vocab_size, d_model=model.d_model, num_layers=2 * num_layers,
                        layout=(conv, lm.MixerSpec(mixer, tuple(sorted(kwargs.items())))),
                        mlp="none", norm="rmsnorm", positions="none", max_len=max_len)


# ---------------------------------------------------------------------------
# Task sources.


def sources(config, split: str) -> list:
  """The split's sources, one per task setting (drawn once, held in memory)."""
  seed = {"train": 0, "validation": 1, "test": 2}[split] * 1_000_003 + config.seed
  if config.task == "mqar":
    return [synthetic.InMemorySource(synthetic.MQARSource(
        synthetic.MQARConfig(config.vocab_size, length, kv, config.mqar.power_a),
        count, seed=seed + i)) for i, (length, kv, count) in enumerate(config.mqar[split])]
  if config.task == "icll":
    icll = config.icll
    icll_config = synthetic.ICLLConfig(num_states=tuple(icll.num_states),
                                       num_strings=tuple(icll.num_strings),
                                       string_length=tuple(icll.string_length),
                                       num_dfas=tuple(icll.num_dfas), seed=config.seed)
    count = icll.train_examples if split == "train" else None   # each held-out DFA once
    return [synthetic.InMemorySource(synthetic.ICLLSource(icll_config, split, count, seed=seed))]
  if config.task == "set_disjointness":
    sd = config.set_disjointness
    count = sd.train_examples if split == "train" else sd.eval_examples
    return [synthetic.InMemorySource(synthetic.SetDisjointnessSource(
        synthetic.SetDisjointnessConfig(config.vocab_size, (tuple(sizes),)), count,
        seed=seed + i)) for i, sizes in enumerate(sd[split])]
  raise ValueError(f"config.task={config.task!r}; expected one of {', '.join(GROUPS)}")


def max_len(config) -> int:
  """The longest example of the sweep (attention's cache capacity), JRT's doubling included."""
  if config.task == "mqar":
    return 2 * max(length for split in ("train", "validation", "test")
                   for length, _, _ in config.mqar[split])
  if config.task == "icll":   # strings and separators, read twice with JRT-Prompt
    return 2 * config.icll.num_strings[1] * (config.icll.string_length[1] + 1)
  return 2 * (3 + max(a + b for split in ("train", "validation", "test")
                      for a, b in config.set_disjointness[split]))


# Per-example fields each task's accuracy is broken down by (the first is plotted).
GROUPS = {"mqar": ("num_kv_pairs", "seq_len"), "set_disjointness": ("set_order", "size_a"),
          "icll": ("num_states",), "passkey": ("length", "depth_index")}


@functools.lru_cache(maxsize=64)
def _predictor(model_cfg, token_offset: int = 0, num_classes: int | None = None):
  """The jitted greedy predictor of a model config, built once per config."""
  return recall.make_predict(models.build(model_cfg), token_offset=token_offset,
                             num_classes=num_classes)


def padded_len(source, jrt_repeats: int) -> int:
  """The longest example of an in-memory source after JRT-Prompt: its batches' one length."""
  return max(e["inputs"].size + (jrt_repeats - 1) * int(e["context_len"]) for e in source.examples)


def evaluate(config, model_cfg, params, test_sources, jrt_repeats: int = 1,
             token_offset: int = 0, num_classes: int | None = None) -> dict:
  """Test accuracy overall and per group (``GROUPS``), each setting with its own context.

  ``accuracy`` is the task's metric: token accuracy at the labelled positions,
  except for ICLL, where it is the DFA acceptance of the greedy next token
  (``icll.acceptance_accuracy``, per group too; the token accuracy is then
  ``token_accuracy``). ``token_offset`` and ``num_classes`` read the task's
  ids inside a larger vocabulary (``recall.make_predict``).
  """
  predicted, accepted = [], []
  for source in test_sources:
    predict = _predictor(tasks.for_context(model_cfg, tasks.context_len(source) * jrt_repeats),
                         token_offset, num_classes)
    for batch in synthetic.task_dataset(source, batch_size=config.batch_size, num_epochs=1,
                                        shuffle=False, jrt_repeats=jrt_repeats,
                                        seq_len=padded_len(source, jrt_repeats)):
      predictions = predict(params, batch)
      predicted.append((batch, predictions))
      if config.task == "icll":
        for row in range(len(predictions)):
          one = {k: v[row:row + 1] for k, v in batch.items()}
          accepted.append((int(batch["num_states"][row]), int(one["loss_mask"].sum()),
                           synthetic.icll.acceptance_accuracy(source.source, one,
                                                            predictions[row:row + 1])))
  result = recall.accuracy(predicted, group_by=GROUPS[config.task])
  if config.task == "icll":
    def acceptance(rows):
      return float(sum(n * a for _, n, a in rows) / max(sum(n for _, n, _ in rows), 1))
    result["token_accuracy"] = result["accuracy"]
    result["accuracy"] = acceptance(accepted)
    for states, figures in result["by_num_states"].items():
      figures["token_accuracy"] = figures["accuracy"]
      figures["accuracy"] = acceptance([r for r in accepted if r[0] == states])
  return result


# ---------------------------------------------------------------------------
# Cells.


def cell_name(model: Model, lr: float) -> str:
  return f"{model.name}-lr{lr:.2e}"


def save_params(directory: str, params) -> None:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), params)
  checkpointer.wait_until_finished()


def load_params(directory: str, model_cfg) -> dict:
  """A cell's parameters, restored onto the structure of ``model_cfg``'s."""
  model = models.build(model_cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               np.zeros((1, 8), np.int32))["params"])
  return ocp.StandardCheckpointer().restore(os.path.abspath(directory), abstract)


def run_cell(config, workdir: str, model: Model, lr: float, train, val, test) -> dict:
  """Trains and evaluates one cell, or reads its finished result."""
  directory = os.path.join(workdir, "cells", cell_name(model, lr))
  result_path = os.path.join(directory, RESULT)
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  model_cfg = model_config(model, config.vocab_size, config.num_layers, max_len(config))
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"model": model_cfg.to_dict(), "cell": dataclasses.asdict(model), "lr": lr}, f,
              indent=2)
  validate = lambda params: evaluate(config, model_cfg, params, val)["accuracy"]
  fit = tasks.fit(model_cfg, train, validate=validate, steps=config.steps,
                  batch_size=config.batch_size,
                  lr=lr, weight_decay=config.weight_decay, eval_every=config.eval_every,
                  target_accuracy=config.target_accuracy, seed=config.seed,
                  description=cell_name(model, lr))
  test_result = evaluate(config, model_cfg, fit.params, test)
  params_dir = os.path.join(directory, "params")
  if os.path.exists(params_dir):   # a crashed earlier attempt: keep it aside, never delete
    os.replace(params_dir, f"{params_dir}.stale-{int(time.time())}")
  save_params(params_dir, fit.params)
  result = {"cell": cell_name(model, lr), "model": model.name, **dataclasses.asdict(model),
            "lr": lr, "state_bytes": models.state_bytes(model_cfg),
            "params": int(sum(p.size for p in jax.tree_util.tree_leaves(fit.params))),
            "steps": fit.steps, "val_accuracy": fit.val_accuracy, "train_s": fit.wall_s,
            "history": fit.history, "test": test_result}
  tmp = result_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, result_path)
  jax.clear_caches()   # a long sweep must not pile up compiled programs (BUILD.md)
  return result


def _identity(plain: dict) -> dict:
  """What a finished cell's result depends on: everything but the grid and the lrs (which
  add cells) and the sections of the other tasks."""
  others = set(GROUPS) - {plain["task"]}
  return {k: v for k, v in plain.items() if k not in ("grid", "lrs") and k not in others}


def check_workdir(config, workdir: str) -> None:
  """Stores the sweep config, or refuses a work directory of a different sweep."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  plain = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if _identity(stored) != _identity(plain):
      raise ValueError(f"--workdir={workdir} holds a sweep of a different task config; "
                       "expected an empty directory or the same config")
  with open(path, "w") as f:
    json.dump(plain, f, indent=2)


# ---------------------------------------------------------------------------
# Tables and plots.


def best_per_model(results: list[dict]) -> list[dict]:
  """Each model's cell with the best validation accuracy (Zoology's max over lrs)."""
  best = {}
  for r in results:
    if r["model"] not in best or r["val_accuracy"] > best[r["model"]]["val_accuracy"]:
      best[r["model"]] = r
  return list(best.values())


def rows(task: str, results: list[dict]) -> list[dict]:
  """One flat row per model: overall accuracy and accuracy per group value."""
  out = []
  for r in best_per_model(results):
    row = {k: r[k] for k in ("model", "arch", "d_model", "knob", "lr", "state_bytes", "params",
                             "steps", "val_accuracy", "train_s")}
    row["test_accuracy"] = r["test"]["accuracy"]
    for value, fig in r["test"][f"by_{GROUPS[task][0]}"].items():
      row[f"acc_{GROUPS[task][0]}={value}"] = fig["accuracy"]
    out.append(row)
  return sorted(out, key=lambda row: (row["arch"], row["state_bytes"]))


def plot(task: str, table: list[dict], workdir: str) -> list[str]:
  """The sweep's figures (module docstring); returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  paths = []
  archs = sorted({row["arch"] for row in table})
  colors = dict(zip(archs, plt.cm.tab10.colors))
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for arch in archs:
    pts = sorted((row["state_bytes"], row["test_accuracy"]) for row in table if row["arch"] == arch)
    ax.plot(*zip(*pts), "o-", label=arch, color=colors[arch])
  ax.set_xscale("log")
  ax.set_xlabel("recurrent state (bytes per sequence)")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(f"{task}: accuracy vs state size")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  ax.grid(alpha=0.3)
  paths.append(os.path.join(workdir, "accuracy_vs_state.png"))
  fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
  plt.close(fig)
  group = GROUPS[task][0]
  keys = sorted({k for row in table for k in row if k.startswith(f"acc_{group}=")},
                key=lambda k: int(k.split("=")[1]))
  values = [int(k.split("=")[1]) for k in keys]
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  if task in ("mqar", "icll"):
    for row in table:
      ax.plot(values, [row.get(k, np.nan) for k in keys], "o-", color=colors[row["arch"]],
              alpha=0.5 + 0.5 * (row["state_bytes"] == max(
                  r["state_bytes"] for r in table if r["arch"] == row["arch"])),
              label=f"{row['model']} ({row['state_bytes']:,} B)")
    ax.set_xlabel("key-value pairs" if task == "mqar" else "DFA states (minimised)")
    name = "accuracy_vs_kv.png" if task == "mqar" else "accuracy_vs_states.png"
  else:
    labels = {0: "short set first", 1: "long set first", 2: "equal sizes"}
    width = 0.8 / max(len(values), 1)
    for j, (value, key) in enumerate(zip(values, keys)):
      ax.bar(np.arange(len(table)) + j * width, [row.get(key, np.nan) for row in table], width,
             label=labels[value])
    ax.set_xticks(np.arange(len(table)) + width * (len(values) - 1) / 2,
                  [row["model"] for row in table], rotation=60, ha="right", fontsize=7)
    name = "accuracy_by_order.png"
  ax.set_ylabel("test accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  ax.grid(alpha=0.3)
  paths.append(os.path.join(workdir, name))
  fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
  plt.close(fig)
  return paths


def write_results(task: str, results: list[dict], workdir: str) -> list[dict]:
  table = rows(task, results)
  columns = list(dict.fromkeys(k for row in table for k in row))
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"task": task, "models": table, "cells": results}, f, indent=2)
  return table


def format_table(task: str, table: list[dict]) -> str:
  group = GROUPS[task][0]
  keys = sorted({k for row in table for k in row if k.startswith(f"acc_{group}=")},
                key=lambda k: int(k.split("=")[1]))
  head = f"{'model':<26} {'state B':>9} {'lr':>8} {'steps':>5} {'val':>6} {'test':>6} " + " ".join(
      f"{k[4:]:>14}" for k in keys)
  lines = [head]
  for row in table:
    lines.append(f"{row['model']:<26} {row['state_bytes']:>9,} {row['lr']:>8.1e} "
                 f"{row['steps']:>5} {row['val_accuracy']:>6.3f} {row['test_accuracy']:>6.3f} "
                 + " ".join(f"{row.get(k, float('nan')):>14.3f}" for k in keys))
  return "\n".join(lines)


def sweep(config, workdir: str) -> list[dict]:
  """Runs (or resumes) every cell; writes the tables and plots; returns the table."""
  start = time.perf_counter()
  grid = [Model.parse(entry) for entry in config.grid]
  check_workdir(config, workdir)
  train, val, test = (sources(config, split) for split in ("train", "validation", "test"))
  results = []
  for i, model in enumerate(grid):
    for lr in config.lrs:
      result = run_cell(config, workdir, model, lr, train, val, test)
      results.append(result)
      print(f"[{i + 1}/{len(grid)}] {result['cell']}: val {result['val_accuracy']:.3f}, "
            f"test {result['test']['accuracy']:.3f} after {result['steps']} steps "
            f"({result['train_s']:.0f} s), state {result['state_bytes']:,} B", flush=True)
  table = write_results(config.task, results, workdir)
  plot(config.task, table, workdir)
  print(format_table(config.task, table))
  print(f"recall_sweep: {len(results)} cells, {time.perf_counter() - start:.0f} s; "
        f"results in {workdir}")
  return table


# ---------------------------------------------------------------------------
# JRT-Prompt on a finished sweep (experiments.jrt_eval).


def jrt_table(workdir: str, repeats: int = 2) -> list[dict]:
  """One row per trained model of the sweep in ``workdir`` (module docstring)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir={workdir} has no config.json; expected a recall_sweep "
                            "work directory")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(workdir, "results.json")) as f:
    cells = json.load(f)["cells"]
  test = sources(config, "test")
  group = GROUPS[config.task][0]
  table = []
  for cell in sorted(best_per_model(cells), key=lambda c: (c["arch"], c["state_bytes"])):
    directory = os.path.join(workdir, "cells", cell["cell"])
    with open(os.path.join(directory, "config.json")) as f:
      model_cfg = models.config_from_dict(json.load(f)["model"])
    params = load_params(os.path.join(directory, "params"), model_cfg)
    once = evaluate(config, model_cfg, params, test)
    twice = evaluate(config, model_cfg, params, test, jrt_repeats=repeats)
    row = {"model": cell["model"], "arch": cell["arch"], "state_bytes": cell["state_bytes"],
           "accuracy": once["accuracy"], "jrt_accuracy": twice["accuracy"],
           "delta": twice["accuracy"] - once["accuracy"]}
    for value, fig in once[f"by_{group}"].items():
      jrt = twice[f"by_{group}"][value]["accuracy"]
      row[f"{group}={value}"] = fig["accuracy"]
      row[f"{group}={value} jrt"] = jrt
      row[f"{group}={value} delta"] = jrt - fig["accuracy"]
    table.append(row)
  with open(os.path.join(workdir, "jrt_eval.json"), "w") as f:
    json.dump({"task": config.task, "repeats": repeats, "models": table}, f, indent=2)
  with open(os.path.join(workdir, "jrt_eval.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, list(dict.fromkeys(k for row in table for k in row)))
    writer.writeheader()
    writer.writerows(table)
  return table


def format_jrt_table(table: list[dict]) -> str:
  groups = [k[:-6] for k in dict.fromkeys(k for row in table for k in row) if k.endswith(" delta")]
  lines = [f"{'model':<36} {'state B':>9} {'once':>6} {'JRT':>6} {'Δ':>7} "
           + " ".join(f"{'Δ ' + g:>18}" for g in groups)]
  for row in table:
    lines.append(f"{row['model'] + (' (JRT-RNN)' if row['arch'] == 'jrt' else ''):<36} "
                 f"{row['state_bytes']:>9,} {row['accuracy']:>6.3f} {row['jrt_accuracy']:>6.3f} "
                 f"{row['delta']:>+7.3f} "
                 + " ".join(f"{row.get(g + ' delta', float('nan')):>+18.3f}" for g in groups))
  return "\n".join(lines)
