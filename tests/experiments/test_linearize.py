"""experiments/linearize.py on a tiny GPT: convert, LoRA fine-tune, score all three."""

import json

import jax
import numpy as np
import pytest

from experiments import linearize
from experiments.configs import smoke
from recurrent_lm import training
from tests.training.conftest import VOCAB, corpus  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):
  corpus_dir, data_dir = corpus
  config = smoke.get_config("gpt")
  config.data.update(corpus=corpus_dir, data_dir=data_dir, vocab_size=VOCAB)
  config.train.update(steps=12, checkpoint_every=12)
  config.eval.update(max_tokens=2_000)
  workdir = tmp_path_factory.mktemp("teacher") / "gpt"
  training.train(config, str(workdir))
  return workdir


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_only_lora_is_trained_and_all_three_models_are_scored(teacher, tmp_path):
  workdir = tmp_path / "liger"
  report = linearize.linearize(str(teacher), str(workdir), mixer="liger_attention", window=8,
                               lora_rank=4, steps=4, peak_lr=1e-2, max_tokens=2_000)
  assert json.loads((workdir / "linearize.json").read_text()) == report
  results = report["results"]
  assert list(results) == ["transformer", "liger, converted", "liger + LoRA (4 steps)"]
  for metrics in results.values():
    assert metrics["tokens"] == 2_000 and np.isfinite(metrics["loss"])
  assert results["transformer"]["ppl_recovered"] == pytest.approx(1.0)
  assert results["liger, converted"]["gap_closed"] == pytest.approx(0.0)
  # LoRA rank 4 on q, k, v of 2 layers of width 64 with 2 heads of 32.
  assert report["trainable_params"] == 2 * 3 * (64 * 4 + 4 * 64)

  _, teacher_state = training.restore_state(str(teacher))
  _, student_state = training.restore_state(str(workdir))
  teacher_params = {training.param_path(p): x for p, x in
                    jax.tree_util.tree_flatten_with_path(teacher_state.params)[0]}
  changed = set()
  for path, x in jax.tree_util.tree_flatten_with_path(student_state.params)[0]:
    name = training.param_path(path)
    if name in teacher_params:
      np.testing.assert_array_equal(x, teacher_params[name], err_msg=name)
    elif not np.array_equal(x, np.zeros_like(x)):
      changed.add(name)
  assert changed and all("lora" in name for name in changed), changed
  assert "linearize" not in linearize.format_table(report)   # a table, not a traceback


@pytest.mark.slow   # a whole experiment run: `make test-slow`
def test_an_existing_workdir_is_refused(teacher, tmp_path):
  with pytest.raises(ValueError, match="exists; expected a new directory"):
    linearize.linearize(str(teacher), str(tmp_path), mixer="liger_gla", window=8,
                        lora_rank=4, steps=2, peak_lr=1e-3)
