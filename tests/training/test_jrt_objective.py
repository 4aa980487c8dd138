"""JRT-RNN's objective: next-token loss after the prefix + 0.25 × masked LM on it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recurrent_lm import models
from recurrent_lm import training
from recurrent_lm.training import step as step_lib
from tests.layers._util import assert_close
from tests.training.conftest import VOCAB
from tests.training.test_train import OPTIMIZER, _batch

PREFIX = 4


def _jrt_config():
  return models.ModelConfig(
      vocab_size=VOCAB, d_model=32, num_layers=1, mlp="none", norm="rmsnorm",
      layout=(models.MixerSpec("jrt", (("feature_dim", 4), ("num_heads", 2),
                                       ("prefix_len", PREFIX))),))


def test_prefix_len_is_read_from_the_layout():
  assert models.prefix_len(_jrt_config()) == PREFIX
  assert models.prefix_len(models.presets.get("gpt_cpu_tiny", vocab_size=VOCAB)) is None
  spec = lambda m: models.MixerSpec("jrt", (("num_heads", 2), ("prefix_len", m)))
  two = models.ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, layout=(spec(4), spec(8)))
  with pytest.raises(ValueError, match=r"prefix_len \[4, 8\]; expected one prefix length"):
    models.prefix_len(two)


def test_masks_split_every_document_into_prefix_and_decoder():
  batch = _batch(0, batch=64, length=32)
  inputs, next_mask, mlm_mask = step_lib.loss_masks(_jrt_config(), batch, jax.random.key(0))
  segment_ids = np.asarray(batch["segment_ids"])
  for row in range(segment_ids.shape[0]):
    position = 0
    for t in range(segment_ids.shape[1]):
      if t and segment_ids[row, t] != segment_ids[row, t - 1]:
        position = 0
      valid = segment_ids[row, t] > 0
      assert next_mask[row, t] == float(valid and position >= PREFIX), (row, t)
      if not valid or position >= PREFIX:
        assert mlm_mask[row, t] == 0, (row, t)
      position += 1
  masked = np.asarray(mlm_mask) > 0
  np.testing.assert_array_equal(np.asarray(inputs)[masked], 1)
  np.testing.assert_array_equal(np.asarray(inputs)[~masked], np.asarray(batch["inputs"])[~masked])
  prefix_tokens = np.sum((segment_ids > 0) & (np.asarray(next_mask) == 0))
  share = masked.sum() / prefix_tokens          # ~ Binomial(n ≈ 500, 0.15) / n
  assert 0.10 < share < 0.20, share


def test_without_a_prefix_every_real_token_is_scored_and_nothing_masked():
  batch = _batch(0)
  config = models.presets.get("qlstm_cpu_tiny", vocab_size=VOCAB)
  inputs, next_mask, mlm_mask = step_lib.loss_masks(config, batch, jax.random.key(0))
  np.testing.assert_array_equal(inputs, batch["inputs"])
  np.testing.assert_array_equal(next_mask, np.asarray(batch["segment_ids"]) > 0)
  assert float(jnp.sum(mlm_mask)) == 0


def test_loss_is_next_token_after_the_prefix_plus_a_quarter_of_the_masked_lm():
  model = models.LanguageModel(_jrt_config())
  optimizer = training.make_optimizer(OPTIMIZER, 100)
  state = nn.meta.unbox(training.init_state(model, optimizer, (1, 1), seed=0))
  batch = _batch(1, batch=8, length=24)
  objective = jax.jit(lambda params: _objective(model, params, batch, state))
  (loss, (next_loss, mlm_loss)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)

  results = []
  for accum in (1, 2):
    step = jax.jit(training.make_train_step(model, optimizer, accum_steps=accum))
    results.append(step(state, batch))
  for new_state, metrics in results:
    assert_close(metrics["loss"], next_loss, 1e-5, "next-token loss")
    assert_close(metrics["mlm_loss"], mlm_loss, 1e-5, "masked-LM loss")
    assert_close(metrics["grad_norm"], optax.tree.norm(grads), 1e-5, "grad norm")
  jax.tree_util.tree_map(lambda a, b: assert_close(a, b, 1e-5, "params"),
                         results[1][0].params, results[0][0].params)
  assert float(loss) > float(next_loss)


def _objective(model, params, batch, state):
  """The loss written out: means over the decoder tokens and the masked tokens."""
  inputs, next_mask, mlm_mask = step_lib.loss_masks(
      model.config, batch, jax.random.fold_in(state.rng, state.step))
  logits, _ = model.apply({"params": params}, inputs, segment_ids=batch["segment_ids"])
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  mlm = -jnp.take_along_axis(logp, batch["inputs"][..., None], -1)[..., 0]
  next_loss = jnp.sum(nll * next_mask) / jnp.sum(next_mask)
  mlm_loss = jnp.sum(mlm * mlm_mask) / jnp.sum(mlm_mask)
  return next_loss + 0.25 * mlm_loss, (next_loss, mlm_loss)
