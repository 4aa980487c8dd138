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

from absl import app
from absl import flags

from experiments import _cli
from experiments import recall_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A recall_sweep work directory.", required=True)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Copies of the context with JRT-Prompt.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  if _REPEATS.value < 2:
    _cli.fail("jrt_eval.py", ValueError(f"--repeats={_REPEATS.value}; expected ≥ 2"), 2)
  try:
    table = recall_lib.jrt_table(_WORKDIR.value, _REPEATS.value)
  except (ValueError, FileNotFoundError) as error:
    _cli.fail("jrt_eval.py", error, 2)
  print(f"accuracy with the context read once and with JRT-Prompt ({_REPEATS.value} copies)")
  print(recall_lib.format_jrt_table(table))


if __name__ == "__main__":
  app.run(main)
