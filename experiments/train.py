r"""Trains a language model: ``python -m experiments.train --config=… --workdir=…``.

    python -m experiments.train --config=experiments/configs/smoke.py --workdir=/tmp/smoke
    python -m experiments.train --config=experiments/configs/languini.py:gpt_small \
        --workdir=runs/gpt_small --config.train.steps=18265 --config.data.batch_size=128

Any config field can be overridden (``--config.optimizer.peak_lr=1e-3``). The
run writes its resolved config, checkpoints, ``metrics.jsonl``, TensorBoard
scalars and ``summary.json`` into ``--workdir``; the same command again resumes
from the newest checkpoint. Bad input (config, work directory, data) ends the
program with one line on stderr and exit status 2; a non-finite loss with
status 3; in a run of several processes, the death of another one with
status 4 (one line, at once).

Several processes (one per host): ``--coordinator_address=host0:1234
--num_processes=N --process_id=i`` on each, or ``--distributed_auto`` where
JAX finds the cluster itself (TPU pod slices, SLURM); see
``training.distributed``.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from experiments import _cli
from recurrent_lm import training
from recurrent_lm.training import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/smoke.py", "Run config file (ml_collections).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "Several processes: process 0's host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Several processes: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Several processes: this one's index.")
_AUTO = flags.DEFINE_bool("distributed_auto", False,
                          "Several processes, found by JAX (TPU pod slice, SLURM, Open MPI).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100,
                                  "Several processes: a silent peer ends the run after this.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           auto=_AUTO.value, heartbeat_timeout_s=_HEARTBEAT.value)
    summary = training.train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as error:
    _cli.fail("train.py", error, 3 if isinstance(error, FloatingPointError) else 2)
  except jax.errors.JaxRuntimeError as error:
    if jax.process_count() == 1:
      raise
    # A collective failed: another process died. Say so in one line and leave at once; a
    # normal exit would wait at JAX's shutdown barrier for the dead peer, then abort.
    first = str(error).splitlines()[0][:300]
    print(f"train.py: error: process {jax.process_index()} of {jax.process_count()}: a "
          f"collective failed, so another process has most likely died ({first}); the newest "
          "checkpoint is kept: rerun every process to resume", file=sys.stderr, flush=True)
    os._exit(4)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
