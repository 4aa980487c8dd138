"""Accuracy on the synthetic recall tasks: greedy predictions at the scored positions.

For a batch of task examples (``recurrent_lm.data.synthetic``) the model reads
``inputs`` once, as in training, and predicts ``argmax logits`` everywhere; a
scored position (``loss_mask`` 1) is right when its prediction equals its
``targets`` label::

    token accuracy   = Σ right / Σ scored                       (MQAR, set disjointness)
    example accuracy = mean over examples of [every scored position right]   (passkey)

Because the labels are the tokens the model would emit next, teacher-forced
accuracy here equals greedy decoding's for one-token answers, and for a
multi-token answer "every position right" equals greedy decoding emitting it.
"""

from __future__ import annotations

import collections
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def make_predict(model, *, token_offset: int = 0, num_classes: int | None = None):
  """``predict(params, batch) -> [B, L] int32`` greedy tokens, jitted (one compile per shape).

  A task of its own vocabulary ``[0, C)`` can be read by a model of a larger
  one (a language model evaluated zero-shot): task id ``t`` is fed as model
  id ``t + token_offset`` (e.g. past the tokenizer's pad, unk and eod), and
  the prediction is the argmax over the ``C = num_classes`` model ids
  ``[token_offset, token_offset + C)``, as a task id::

      predictions = argmax_{c < C} logits(inputs + offset)[..., offset + c]

  The defaults (0, None) are the plain argmax over the model's vocabulary.
  """
  vocab = model.config.vocab_size
  num_classes = vocab - token_offset if num_classes is None else num_classes
  if token_offset < 0 or num_classes < 1 or token_offset + num_classes > vocab:
    raise ValueError(f"task ids [0, {num_classes}) at offset {token_offset} do not fit the "
                     f"model's vocabulary of {vocab}; expected offset + classes <= {vocab}")

  @jax.jit
  def predict(params, inputs, segment_ids):
    logits, _ = model.apply({"params": params}, inputs + token_offset, segment_ids=segment_ids)
    logits = logits[..., token_offset:token_offset + num_classes]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return lambda params, batch: np.asarray(predict(params, batch["inputs"], batch["segment_ids"]))


def scored_counts(batch: Mapping[str, np.ndarray], predictions) -> tuple[np.ndarray, np.ndarray]:
  """``(right [B], scored [B])``: per example, scored positions predicted right and scored positions."""
  scored = (np.asarray(batch["loss_mask"]) > 0) & (np.asarray(batch["segment_ids"]) > 0)
  right = scored & (np.asarray(predictions) == np.asarray(batch["targets"]))
  return right.sum(-1), scored.sum(-1)


def accuracy(predicted: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray]],
             group_by: Sequence[str] = ()) -> dict:
  """Token and example accuracy over ``(batch, predictions)`` pairs, overall and per group.

  Args:
    predicted: task batches (``synthetic.task_dataset`` with ``num_epochs=1``),
      each with its ``[B, L]`` greedy predictions (:func:`make_predict`).
    group_by: per-example fields (e.g. ``num_kv_pairs``, ``set_order``) to break
      the figures down by.

  Returns:
    ``{"accuracy", "example_accuracy", "scored", "examples"}`` and, for each
    field in ``group_by``, ``"by_<field>": {value: {same keys}}``.
  """
  totals = collections.defaultdict(lambda: np.zeros(4))   # right, scored, exact, examples
  for batch, predictions in predicted:
    right, scored = scored_counts(batch, predictions)
    exact = (right == scored) & (scored > 0)
    keys = [("all",)] + [(name, int(v)) for name in group_by
                         for v in np.unique(batch[name])]
    for key in keys:
      rows = slice(None) if key == ("all",) else np.asarray(batch[key[0]]) == key[1]
      totals[key] += [right[rows].sum(), scored[rows].sum(), exact[rows].sum(),
                      np.sum(scored[rows] > 0)]

  def figures(t):
    return {"accuracy": float(t[0] / max(t[1], 1)), "example_accuracy": float(t[2] / max(t[3], 1)),
            "scored": int(t[1]), "examples": int(t[3])}
  result = figures(totals[("all",)])
  for name in group_by:
    result[f"by_{name}"] = {value: figures(t) for (field, *rest), t in sorted(totals.items())
                            if field == name for value in rest}
  return result
