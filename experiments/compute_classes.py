r"""Languini-style comparison at equal compute, with power-law fits.

    python -m experiments.compute_classes --workdir=runs/classes_cpu
    python -m experiments.compute_classes --workdir=runs/languini \
        --config=experiments/configs/compute_classes.py:languini

For every preset of the sweep config (``configs/compute_classes.py``):

1. its training throughput on this device, Languini's way (the full step on
   random tokens, warm-up then the median of timed steps), read from
   ``--throughput_csv`` when measured before, else measured and stored there;
2. for every compute class (device-hours, ``hour_seconds`` seconds each) the
   token budget and step count, a training run with the schedule fitted to it
   (``<workdir>/runs/<preset>/<h>h``), and the test split's perplexity and
   per-byte perplexity. A finished run is skipped; an interrupted one resumes.

Then a power law per architecture of per-byte perplexity against compute and
each one's crossing with the reference (the GPT), written as ``report.md``,
``results.csv``, ``fits.csv`` and ``scaling.png`` (log-log, fits dashed).
Bad input ends the program with one line on stderr and exit status 2.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import _cli
from experiments import compute_classes_lib as lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/compute_classes.py:cpu", "Sweep config (ml_collections).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the sweep.", required=True)
_THROUGHPUT_CSV = flags.DEFINE_string(
    "throughput_csv", "", "Throughput measurements, keyed by device (default: in --workdir).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  workdir = os.path.abspath(_WORKDIR.value)
  try:
    lib.run(_CONFIG.value, workdir,
        _THROUGHPUT_CSV.value or os.path.join(workdir, "throughput.csv"))
  except (ValueError, FileNotFoundError) as error:
    _cli.fail("compute_classes.py", error, 2)


if __name__ == "__main__":
  app.run(main)
