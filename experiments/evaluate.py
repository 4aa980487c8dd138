r"""Evaluates a trained run: ``python -m experiments.evaluate --workdir=…``.

Rebuilds the model from ``<workdir>/config.json`` alone, restores the newest
readable checkpoint and scores a split (``--split``, default from the
config's ``eval`` section): token perplexity, Languini's normalised (per-byte)
perplexity and bits per byte. Recurrent models carry their state across
windows; models with full attention use overlapping windows that score only
their last ``stride`` tokens. The metrics go to
``<workdir>/eval_<split>_step<N>.json`` and stdout.
"""

import json

from absl import app
from absl import flags

from experiments import _cli
from experiments import evaluate_lib
from recurrent_lm import data as data_lib
from recurrent_lm import evaluation

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a train.py run.", required=True)
_SPLIT = flags.DEFINE_enum("split", None, list(data_lib.SPLITS), "Split; the config's if unset.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None,
                                   "Score at most this many tokens (0: all); the config's if unset.")
_MODE = flags.DEFINE_enum("mode", None, list(evaluation.MODES), "carry | window | auto.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  try:
    metrics = evaluate_lib.evaluate(_WORKDIR.value, _SPLIT.value, _MAX_TOKENS.value, _MODE.value)
  except (ValueError, FileNotFoundError) as error:
    _cli.fail("evaluate.py", error, 2)
  print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
  app.run(main)
