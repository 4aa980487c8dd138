"""Scoring a trained run's newest checkpoint (``evaluate.py``'s work, without its flags,
so sweeps, notebooks and tests can call it).

* :func:`evaluate` — perplexity of a split: token perplexity, Languini's
  per-byte perplexity and bits per byte.
* :func:`evaluate_task` — zero-shot recall of the language model on the
  synthetic tasks (:data:`TASKS`), greedy as in ``evaluation.recall``:

      passkey  the key hidden in filler text, over the run's own tokenizer:
               ``example_accuracy`` is the share of keys recalled exactly
               (every digit; by length and depth)
      mqar     multi-query associative recall: ``accuracy`` over the queries
               (by number of key–value pairs)
      icll     in-context language learning on held-out random DFAs:
               ``accuracy`` is the DFA acceptance of the next token (by states)

  MQAR and ICLL have vocabularies of their own: task id ``t`` is read as model
  id ``t + 3``, past the tokenizer's ``<pad>``, ``<unk>`` and ``<eod>``, and
  the model's prediction is its argmax over the task's ids
  (``recall.make_predict``), so a task token is never the end-of-document mark.

Both restore the checkpoint onto ``mesh`` (default: the run's mesh if it fits
the devices here, else all of them on ``data``), whatever mesh wrote it.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np
import tqdm

from experiments import recall_lib
from recurrent_lm import data as data_lib
from recurrent_lm import evaluation
from recurrent_lm import inference
from recurrent_lm import models
from recurrent_lm import training
from recurrent_lm.data import synthetic

TASKS = ("perplexity", "passkey", "mqar", "icll")
# Model ids 0, 1, 2 are the tokenizer's <pad>, <unk> and <eod>.
TOKEN_OFFSET = 3
MQAR_KV_PAIRS = (4, 8, 16)


def evaluate(workdir: str, split: str | None = None, max_tokens: int | None = None,
             mode: str | None = None, progress: bool = True, mesh=None) -> dict:
  """Scores the newest checkpoint of ``workdir``; writes and returns the metrics."""
  config, state = training.restore_state(workdir, mesh)
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


@dataclasses.dataclass(frozen=True)
class TaskSettings:
  """How a recall task is drawn and read.

  Attributes:
    lengths: prompt lengths in tokens (passkey: each a setting; MQAR: each
      with every pair count that fits; ICLL: the longest bounds the strings);
      empty: the run's ``data.seq_len``.
    num_examples: examples per setting (ICLL: held-out DFAs, one example each).
    batch_size: examples per forward pass.
    jrt_repeats: JRT-Prompt: the context is read this many times.
    seed: draws the examples.
  """
  lengths: tuple[int, ...] = ()
  num_examples: int = 64
  batch_size: int = 8
  jrt_repeats: int = 1
  seed: int = 0

  def __post_init__(self):
    for name in ("num_examples", "batch_size", "jrt_repeats"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; expected a positive int")
    if not all(isinstance(n, int) and n >= 1 for n in self.lengths):
      raise ValueError(f"lengths={self.lengths!r}; expected positive ints")


def task_sources(task: str, tokenizer: data_lib.Tokenizer, lengths: tuple[int, ...],
                 settings: TaskSettings) -> tuple[list, int, int | None]:
  """``(sources, token_offset, num_classes)`` of a recall task (module docstring)."""
  seed = settings.seed
  if task == "passkey":
    sources = [synthetic.PasskeySource(tokenizer, synthetic.PasskeyConfig(lengths=(n,)),
                                       settings.num_examples, seed=seed) for n in lengths]
    return [synthetic.InMemorySource(s) for s in sources], 0, None
  if task == "mqar":
    vocab = min(8192, (tokenizer.vocab_size - TOKEN_OFFSET) // 2 * 2)
    sources = [synthetic.MQARSource(synthetic.MQARConfig(vocab, n, kv), settings.num_examples,
                                    seed=seed + i)
               for i, (n, kv) in enumerate((n, kv) for n in lengths for kv in MQAR_KV_PAIRS
                                           if 4 * kv <= n and kv < vocab // 2)]
    if not sources:
      raise ValueError(f"lengths={lengths}: no MQAR setting fits; expected a length of at "
                       f"least {4 * MQAR_KV_PAIRS[0]} (4 tokens per key-value pair)")
    return [synthetic.InMemorySource(s) for s in sources], TOKEN_OFFSET, vocab
  if task == "icll":
    # An example is at most 19 strings of `longest` letters, each with its separator.
    longest = min(49, max(lengths) // 19 - 1)
    if longest < 1:
      raise ValueError(f"lengths={lengths}: ICLL needs a length of at least 38 "
                       "(19 strings of one letter and their separators)")
    config = synthetic.ICLLConfig(string_length=(1, longest),
                                  num_dfas=(1, 1, settings.num_examples), seed=seed)
    return ([synthetic.InMemorySource(synthetic.ICLLSource(config, "test", seed=seed))],
            TOKEN_OFFSET, synthetic.icll.VOCAB_SIZE)
  raise ValueError(f"task={task!r}; expected one of {', '.join(TASKS[1:])}")


def evaluate_task(workdir: str, task: str, settings: TaskSettings = TaskSettings(),
                  mesh=None) -> dict:
  """Zero-shot accuracy of ``workdir``'s newest checkpoint on a recall task.

  Writes ``<workdir>/eval_<task>_step<N>.json`` and returns it:
  ``recall_lib.evaluate``'s figures (``accuracy``, ``example_accuracy``,
  ``by_<group>``) with ``task``, ``step``, ``lengths`` and ``jrt_repeats``.
  """
  run = inference.load_run(workdir, mesh)
  lengths = settings.lengths or (run.config.data.seq_len,)
  sources, offset, classes = task_sources(task, run.tokenizer, lengths, settings)
  limit = inference.max_context(run.model.config)
  longest = max(recall_lib.padded_len(s, settings.jrt_repeats) for s in sources)
  if limit is not None and longest > limit:
    raise ValueError(f"{task} examples of up to {longest} tokens exceed the model's "
                     f"max_len={limit}; expected shorter --task_lengths")
  sweep = ml_collections.ConfigDict({"task": task, "batch_size": settings.batch_size})
  model_config = training.model_config(run.config)
  result = recall_lib.evaluate(sweep, model_config, run.params,
                               tqdm.tqdm(sources, desc=task, unit="setting", leave=False),
                               jrt_repeats=settings.jrt_repeats, token_offset=offset,
                               num_classes=classes)
  result.update(task=task, step=run.step, lengths=list(lengths),
                jrt_repeats=settings.jrt_repeats)
  training.write_json_atomic(os.path.join(workdir, f"eval_{task}_step{run.step}.json"),
                             json_keys(result))
  return result


def json_keys(value):
  """``value`` with dict keys as strings (per-group figures are keyed by ints)."""
  if isinstance(value, dict):
    return {str(k): json_keys(v) for k, v in value.items()}
  return value
