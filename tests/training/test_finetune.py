"""Fine-tuning: a run starts from another run's parameters and trains a subset."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from recurrent_lm import training
from recurrent_lm.training import loop
from tests.training.conftest import smoke_config
from tests.training.test_train import OPTIMIZER, _batch, _model


def test_frozen_parameters_get_no_update_and_no_optimizer_state():
  model = _model()
  optimizer = training.make_optimizer({**OPTIMIZER, "trainable": "final_norm|logits"}, 100)
  state = nn.meta.unbox(training.init_state(model, optimizer, (1, 1), seed=0))
  step = jax.jit(training.make_train_step(model, optimizer))
  new_state, _ = step(step(state, _batch(0))[0], _batch(1))   # step 0's learning rate is 0
  for path, before in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    name = training.param_path(path)
    after = new_state.params
    for key in path:
      after = after[key.key]
    changed = not np.array_equal(before, after)
    assert changed == ("final_norm" in name or "logits" in name), name
  moments = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state))
  trained = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
                if "final_norm" in training.param_path(path)
                or "logits" in training.param_path(path))
  assert moments <= 2 * trained + 16        # Adam's two moments (+ counters) of those only


def test_a_run_initialised_from_another_trains_only_what_it_is_told(corpus, tmp_path):
  teacher = tmp_path / "teacher"
  training.train(smoke_config(corpus, steps=2, checkpoint_every=2), str(teacher))
  config = smoke_config(corpus, steps=2, checkpoint_every=2, init_from=str(teacher))
  config.optimizer.trainable = "final_norm"
  training.train(config, str(tmp_path / "student"))
  _, teacher_state = training.restore_state(str(teacher))
  _, student_state = training.restore_state(str(tmp_path / "student"))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(teacher_state.params)[0],
                          jax.tree_util.tree_leaves(student_state.params)):
    name = training.param_path(path)
    assert np.array_equal(a, b) != ("final_norm" in name), name


@pytest.mark.parametrize("section, field, value, message", [
    ("optimizer", "trainable", "lora", r"optimizer.trainable='lora' matches no parameter"),
    ("optimizer", "trainable", "(", r"optimizer.trainable='\(' is not a regular expression"),
    ("train", "init_from", "/nonexistent", r"train.init_from='/nonexistent' holds no checkpoints"),
])
def test_bad_fine_tuning_fields_are_one_clear_line(corpus, tmp_path, section, field, value,
                                                   message):
  config = smoke_config(corpus, steps=2)
  config[section][field] = value
  with pytest.raises(ValueError, match=message):
    training.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_run_stored_before_the_fine_tuning_fields_existed_resumes_unchanged(corpus):
  new = loop._plain(smoke_config(corpus, steps=2))
  old = json.loads(json.dumps(new))
  for section, field in (("train", "mlm_weight"), ("train", "mlm_prob"), ("train", "init_from"),
                         ("optimizer", "trainable")):
    del old[section][field]
  assert loop._differences(old, new) == []
  new["optimizer"]["trainable"] = "lora"
  assert loop._differences(old, new) == ["optimizer.trainable: '' -> 'lora'"]
