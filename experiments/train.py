r"""Trains a language model: ``python -m experiments.train --config=… --workdir=…``.

    python -m experiments.train --config=experiments/configs/smoke.py --workdir=/tmp/smoke
    python -m experiments.train --config=experiments/configs/languini.py:gpt_small \
        --workdir=runs/gpt_small --config.train.steps=18265 --config.data.batch_size=128

Any config field can be overridden (``--config.optimizer.peak_lr=1e-3``). The
run writes its resolved config, checkpoints, ``metrics.jsonl``, TensorBoard
scalars and ``summary.json`` into ``--workdir``; the same command again resumes
from the newest checkpoint. Bad input (config, work directory, data) ends the
program with one line on stderr and exit status 2; a non-finite loss with
status 3.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import _cli
from recurrent_lm import training

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/smoke.py", "Run config file (ml_collections).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  try:
    summary = training.train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as error:
    _cli.fail("train.py", error, 3 if isinstance(error, FloatingPointError) else 2)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
