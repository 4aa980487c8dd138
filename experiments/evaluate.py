r"""Evaluates a trained run: ``python -m experiments.evaluate --workdir=…``.

Rebuilds the model from ``<workdir>/config.json`` alone and restores the
newest readable checkpoint, resharded onto the devices here (a run trained on
a pod evaluates on one GPU or a laptop). ``--tasks`` picks what to score:

* ``perplexity`` (default) — a split (``--split``, default from the config's
  ``eval`` section): token perplexity, Languini's normalised (per-byte)
  perplexity and bits per byte. Recurrent models carry their state across
  windows; models with full attention use overlapping windows that score
  only their last ``stride`` tokens.
* ``passkey``, ``mqar``, ``icll`` — zero-shot recall on synthetic prompts of
  ``--task_lengths`` tokens (default: the run's ``seq_len``),
  ``--task_examples`` per setting, optionally read with JRT-Prompt
  (``--jrt_repeats=2``); see ``evaluate_lib``.

Each task's metrics go to ``<workdir>/eval_<split or task>_step<N>.json``;
all of them are printed as one JSON object keyed by task.

    python -m experiments.evaluate --workdir=runs/demo/qlstm --tasks=perplexity,passkey \
        --task_lengths=256,1024
"""

import json

from absl import app
from absl import flags

from experiments import _cli
from experiments import evaluate_lib
from recurrent_lm import data as data_lib
from recurrent_lm import evaluation

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a train.py run.", required=True)
_TASKS = flags.DEFINE_list("tasks", ["perplexity"],
                           f"What to score, of {', '.join(evaluate_lib.TASKS)}.")
_SPLIT = flags.DEFINE_enum("split", None, list(data_lib.SPLITS), "Split; the config's if unset.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None,
                                   "Score at most this many tokens (0: all); the config's if unset.")
_MODE = flags.DEFINE_enum("mode", None, list(evaluation.MODES), "carry | window | auto.")
_TASK_LENGTHS = flags.DEFINE_list("task_lengths", [],
                                  "Prompt lengths of the recall tasks; the run's seq_len if empty.")
_TASK_EXAMPLES = flags.DEFINE_integer("task_examples", 64, "Examples per recall-task setting.")
_TASK_BATCH_SIZE = flags.DEFINE_integer("task_batch_size", 8, "Recall-task batch size.")
_JRT_REPEATS = flags.DEFINE_integer("jrt_repeats", 1, "JRT-Prompt repeats of the task context.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the recall-task examples.")


def _settings() -> evaluate_lib.TaskSettings:
  try:
    lengths = tuple(int(n) for n in _TASK_LENGTHS.value)
  except ValueError:
    raise ValueError(f"--task_lengths={','.join(_TASK_LENGTHS.value)}; expected "
                     "comma-separated token counts") from None
  return evaluate_lib.TaskSettings(lengths, _TASK_EXAMPLES.value, _TASK_BATCH_SIZE.value,
                                   _JRT_REPEATS.value, _SEED.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  results = {}
  try:
    unknown = [t for t in _TASKS.value if t not in evaluate_lib.TASKS]
    if unknown or not _TASKS.value:
      raise ValueError(f"--tasks={','.join(_TASKS.value)}; expected some of "
                       f"{', '.join(evaluate_lib.TASKS)}")
    settings = _settings()
    for task in _TASKS.value:
      if task == "perplexity":
        results[task] = evaluate_lib.evaluate(_WORKDIR.value, _SPLIT.value, _MAX_TOKENS.value,
                                              _MODE.value)
      else:
        results[task] = evaluate_lib.evaluate_task(_WORKDIR.value, task, settings)
  except (ValueError, FileNotFoundError) as error:
    _cli.fail("evaluate.py", error, 2)
  print(json.dumps(evaluate_lib.json_keys(results), indent=2))


if __name__ == "__main__":
  app.run(main)
