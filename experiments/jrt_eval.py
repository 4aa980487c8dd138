r"""JRT-Prompt and JRT-RNN on the recall tasks: accuracy with the context read once and twice.

    python -m experiments.recall_sweep --workdir=runs/recall_quick      # trains the models
    python -m experiments.jrt_eval --workdir=runs/recall_quick          # this table

Every model of a ``recall_sweep`` work directory (its best learning rate) is
evaluated on the sweep's test settings twice: as trained (the context read
once) and with JRT-Prompt (``--repeats`` copies of the context, then the
queries; ``synthetic.jrt_example``). JRT-RNN models (arch ``jrt``) read the
context as their non-causal prefix in both cases — the prefix grows with the
copies. The table gives both accuracies and their difference, overall and per
group (key–value pairs for MQAR, set order for set disjointness), and is
written to ``<workdir>/jrt_eval.{json,csv}``.
"""

from __future__ import annotations

import csv
import json
import os

from absl import app
from absl import flags
import ml_collections

from experiments import _cli
from experiments import recall_lib
from recurrent_lm import models

_WORKDIR = flags.DEFINE_string("workdir", None, "A recall_sweep work directory.", required=True)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Copies of the context with JRT-Prompt.")


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
  test = recall_lib.sources(config, "test")
  group = recall_lib.GROUPS[config.task][0]
  table = []
  for cell in sorted(recall_lib.best_per_model(cells), key=lambda c: (c["arch"], c["state_bytes"])):
    directory = os.path.join(workdir, "cells", cell["cell"])
    with open(os.path.join(directory, "config.json")) as f:
      model_cfg = models.config_from_dict(json.load(f)["model"])
    params = recall_lib.load_params(os.path.join(directory, "params"), model_cfg)
    once = recall_lib.evaluate(config, model_cfg, params, test)
    twice = recall_lib.evaluate(config, model_cfg, params, test, jrt_repeats=repeats)
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


def format_table(table: list[dict]) -> str:
  groups = [k[:-6] for k in dict.fromkeys(k for row in table for k in row) if k.endswith(" delta")]
  lines = [f"{'model':<36} {'state B':>9} {'once':>6} {'JRT':>6} {'Δ':>7} "
           + " ".join(f"{'Δ ' + g:>18}" for g in groups)]
  for row in table:
    lines.append(f"{row['model'] + (' (JRT-RNN)' if row['arch'] == 'jrt' else ''):<36} "
                 f"{row['state_bytes']:>9,} {row['accuracy']:>6.3f} {row['jrt_accuracy']:>6.3f} "
                 f"{row['delta']:>+7.3f} "
                 + " ".join(f"{row.get(g + ' delta', float('nan')):>+18.3f}" for g in groups))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  if _REPEATS.value < 2:
    _cli.fail("jrt_eval.py", ValueError(f"--repeats={_REPEATS.value}; expected ≥ 2"), 2)
  try:
    table = jrt_table(_WORKDIR.value, _REPEATS.value)
  except (ValueError, FileNotFoundError) as error:
    _cli.fail("jrt_eval.py", error, 2)
  print(f"accuracy with the context read once and with JRT-Prompt ({_REPEATS.value} copies)")
  print(format_table(table))


if __name__ == "__main__":
  app.run(main)
