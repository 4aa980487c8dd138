"""Synthetic recall and in-context-learning tasks as grain sources.

    source = synthetic.MQARSource(synthetic.MQARConfig(seq_len=128, num_kv_pairs=8), 20_000)
    ds = synthetic.task_dataset(source, batch_size=64, seed=0)   # shuffled, repeated, batched
    batch = next(iter(ds))     # inputs, targets, loss_mask, segment_ids: [64, L] int32

Every task emits the example format of :mod:`._example` (labels only where
``loss_mask`` is 1, the context JRT-Prompt repeats first), so training,
evaluation and the JRT transform are the same for all of them:

* :mod:`.mqar` — multi-query associative recall (Zoology / BASED);
* :mod:`.set_disjointness` — the shared token of two sets (JRT);
* :mod:`.icll` — in-context language learning on random DFAs;
* :mod:`.passkey` — passkey retrieval over the project's tokenizer (Stuffed Mamba).
"""

from __future__ import annotations

import functools

import grain

from recurrent_lm.data.synthetic._example import InMemorySource
from recurrent_lm.data.synthetic._example import batches_of
from recurrent_lm.data.synthetic._example import jrt_example
from recurrent_lm.data.synthetic._example import make_example
from recurrent_lm.data.synthetic.icll import ICLLConfig
from recurrent_lm.data.synthetic.icll import ICLLSource
from recurrent_lm.data.synthetic.mqar import MQARConfig
from recurrent_lm.data.synthetic.mqar import MQARSource
from recurrent_lm.data.synthetic.passkey import PasskeyConfig
from recurrent_lm.data.synthetic.passkey import PasskeySource
from recurrent_lm.data.synthetic.set_disjointness import SetDisjointnessConfig
from recurrent_lm.data.synthetic.set_disjointness import SetDisjointnessSource


def task_dataset(source, *, batch_size: int, seed: int = 0, seq_len: int | None = None,
                 jrt_repeats: int = 1, num_epochs: int | None = None,
                 shuffle: bool = True) -> grain.MapDataset:
  """A grain pipeline of ``source``'s examples in batches.

  ``source → shuffle(seed) → repeat(num_epochs) → JRT-Prompt (jrt_repeats) →
  batch (padded to seq_len, or to the batch's longest example)``. ``num_epochs``
  None repeats forever (training); 1 with ``shuffle=False`` reads every example
  once in order (evaluation), the last batch smaller.
  """
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if jrt_repeats != 1:
    ds = ds.map(functools.partial(jrt_example, repeats=jrt_repeats))
  return ds.batch(batch_size, drop_remainder=num_epochs is None,
                  batch_fn=functools.partial(batches_of, seq_len=seq_len))


__all__ = [
    "ICLLConfig",
    "ICLLSource",
    "InMemorySource",
    "MQARConfig",
    "MQARSource",
    "PasskeyConfig",
    "PasskeySource",
    "SetDisjointnessConfig",
    "SetDisjointnessSource",
    "batches_of",
    "jrt_example",
    "make_example",
    "task_dataset",
]
