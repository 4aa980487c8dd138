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
import os

from absl import app
from absl import flags
import numpy as np

from experiments import _cli
from recurrent_lm import data as data_lib
from recurrent_lm import evaluation
from recurrent_lm import models
from recurrent_lm import training

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of a train.py run.", required=True)
_SPLIT = flags.DEFINE_enum("split", None, list(data_lib.SPLITS), "Split; the config's if unset.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None,
                                   "Score at most this many tokens (0: all); the config's if unset.")
_MODE = flags.DEFINE_enum("mode", None, list(evaluation.MODES), "carry | window | auto.")


def evaluate(workdir: str, split: str | None = None, max_tokens: int | None = None,
             mode: str | None = None, progress: bool = True) -> dict:
  """Scores the newest checkpoint of ``workdir``; writes and returns the metrics."""
  config, state = training.restore_state(workdir)
  split = split or config.eval.split
  max_tokens = config.eval.max_tokens if max_tokens is None else max_tokens
  if max_tokens < 0:
    raise ValueError(f"max_tokens={max_tokens}; expected >= 0 (0 scores the whole split)")
  model_config = training.model_config(config)
  model = models.build(model_config)
  prepared = data_lib.prepare_dataset(config.data.data_dir or None, config.data.corpus,
                                      config.data.vocab_size)
  stream = np.concatenate(list(data_lib.token_stream(prepared.shards[split])))
  if max_tokens:
    stream = stream[:max_tokens + 1]

  metrics = evaluation.perplexity(
      model, state.params, stream, prepared.tokenizer.byte_lengths,
      eod_id=prepared.tokenizer.eod_id, seq_len=config.data.seq_len,
      batch_size=config.eval.batch_size, mode=mode or config.eval.mode,
      stride=min(config.eval.stride, config.data.seq_len), progress=progress)
  metrics.update(split=split, step=int(state.step))
  path = os.path.join(workdir, f"eval_{split}_step{int(state.step)}.json")
  training.write_json_atomic(path, metrics)
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _cli.quiet_logs()
  try:
    metrics = evaluate(_WORKDIR.value, _SPLIT.value, _MAX_TOKENS.value, _MODE.value)
  except (ValueError, FileNotFoundError) as error:
    _cli.fail("evaluate.py", error, 2)
  print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
  app.run(main)
