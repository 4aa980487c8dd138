"""Scoring a trained run's newest checkpoint (``evaluate.py``'s work, without its flags,
so sweeps and tests can call it)."""

import os

import numpy as np

from recurrent_lm import data as data_lib
from recurrent_lm import evaluation
from recurrent_lm import models
from recurrent_lm import training


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
