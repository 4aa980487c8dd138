"""Accuracy at the scored positions, overall and per group."""

from __future__ import annotations

import numpy as np
import pytest

from recurrent_lm.data import synthetic
from recurrent_lm.evaluation import recall


def _batches(seed):
  source = synthetic.MQARSource(synthetic.MQARConfig(64, 32, 4), 10, seed)
  mixed = [source[i] for i in range(5)] + [
      synthetic.MQARSource(synthetic.MQARConfig(64, 32, 8), 5, seed)[i] for i in range(5)]
  return [synthetic.batches_of(mixed[:6]), synthetic.batches_of(mixed[6:])]


def test_accuracy_counts_right_predictions_at_scored_positions_only():
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  batches = _batches(seed)
  wrong = {}   # per batch: predictions = targets, except some scored positions, plus noise elsewhere

  def predict(params, batch):
    key = id(batch)
    if key not in wrong:
      pred = np.where(batch["loss_mask"] > 0, batch["targets"], rng.integers(0, 64, batch["targets"].shape))
      rows, cols = np.nonzero(batch["loss_mask"])
      flip = rng.random(rows.size) < 0.3
      pred[rows[flip], cols[flip]] = (batch["targets"][rows[flip], cols[flip]] + 1) % 64
      wrong[key] = pred
    return wrong[key]

  result = recall.accuracy([(b, predict(None, b)) for b in batches], group_by=("num_kv_pairs",))
  right = scored = exact = 0
  per_kv = {4: [0, 0], 8: [0, 0]}
  for batch in batches:
    pred = wrong[id(batch)]
    ok = (pred == batch["targets"]) & (batch["loss_mask"] > 0)
    for row in range(len(pred)):
      n, r = int(batch["loss_mask"][row].sum()), int(ok[row].sum())
      right, scored, exact = right + r, scored + n, exact + (r == n)
      per_kv[int(batch["num_kv_pairs"][row])][0] += r
      per_kv[int(batch["num_kv_pairs"][row])][1] += n
  assert result["scored"] == scored == 5 * 4 + 5 * 8
  assert result["accuracy"] == pytest.approx(right / scored)
  assert result["example_accuracy"] == pytest.approx(exact / 10)
  for kv, (r, n) in per_kv.items():
    assert result["by_num_kv_pairs"][kv]["accuracy"] == pytest.approx(r / n), (kv, seed)
  assert 0.5 < result["accuracy"] < 0.9, seed


def test_perfect_predictions_score_one_and_padding_is_never_scored():
  batch = _batches(0)[0]                      # 5 examples with 4 pairs, 1 with 8
  examples = [{k: v[i] for k, v in batch.items() if k != "segment_ids"} for i in range(6)]
  padded = synthetic.batches_of(examples, seq_len=48)
  padded["loss_mask"][:, 40:] = 1             # padding (segment 0) stays unscored regardless
  result = recall.accuracy([(padded, padded["targets"])])
  assert result == {"accuracy": 1.0, "example_accuracy": 1.0, "scored": 5 * 4 + 8, "examples": 6}


def test_make_predict_reads_task_ids_at_an_offset_and_argmaxes_over_the_task_vocabulary():
  """A model of vocabulary 64 reads a task of 20 ids at offset 3: predictions are
  the argmax over model ids 3…22, as task ids, from the shifted inputs."""
  import jax
  from recurrent_lm import models
  model = models.LanguageModel(models.presets.get("qlstm_cpu_tiny", vocab_size=64))
  rng = np.random.default_rng()
  inputs = rng.integers(0, 20, (2, 12)).astype(np.int32)
  batch = {"inputs": inputs, "segment_ids": np.ones_like(inputs)}
  params = model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), inputs[:, :1])["params"]
  got = recall.make_predict(model, token_offset=3, num_classes=20)(params, batch)
  logits, _ = model.apply({"params": params}, inputs + 3, segment_ids=batch["segment_ids"])
  np.testing.assert_array_equal(got, np.asarray(logits)[..., 3:23].argmax(-1))
  assert got.min() >= 0 and got.max() < 20
  plain = recall.make_predict(model)(params, batch)
  full, _ = model.apply({"params": params}, inputs, segment_ids=batch["segment_ids"])
  np.testing.assert_array_equal(plain, np.asarray(full).argmax(-1))
  with pytest.raises(ValueError, match=r"task ids \[0, 62\) at offset 3 do not fit the model's "
                     "vocabulary of 64"):
    recall.make_predict(model, token_offset=3, num_classes=62)
