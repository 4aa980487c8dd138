r"""Recall vs state size: train a grid of models on a synthetic task, evaluate, plot.

    python -m experiments.recall_sweep --workdir=runs/recall_quick                 # quick preset
    python -m experiments.recall_sweep --config=experiments/configs/recall.py:quick_sd \
        --workdir=runs/sd_quick
    python -m experiments.recall_sweep --config=experiments/configs/recall.py:paper \
        --workdir=runs/mqar_paper --config.steps=5000

For every grid entry ``arch:d_model:knob`` (``ARCHS``) and every learning rate
of ``config.lrs`` a *cell* is trained (``training.tasks.fit``: AdamW, cosine,
early stop at 99% validation accuracy), then evaluated on the test settings.
The best learning rate of each model (by validation accuracy) is its result,
as in Zoology. The work directory gets::

    cells/<cell>/{config.json, params/, result.json}   one per cell; finished cells are skipped
    results.csv, results.json                            one row per model (best lr)
    accuracy_vs_state.png                                the BASED Pareto figure
    accuracy_vs_kv.png         (MQAR)                    accuracy by number of key-value pairs
    accuracy_by_order.png      (set disjointness)        short set first vs long set first

Rerunning the same command resumes; a work directory holding a sweep of a
different config is refused. ``experiments.jrt_eval`` reads the cells back; the work is in ``recall_lib``.
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import _cli
from experiments import recall_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/recall.py:quick", "Sweep config (ml_collections).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  try:
    recall_lib.sweep(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as error:
    _cli.fail("recall_sweep.py", error, 3 if isinstance(error, FloatingPointError) else 2)


if __name__ == "__main__":
  app.run(main)
