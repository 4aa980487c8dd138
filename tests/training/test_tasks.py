"""Training on synthetic tasks: the loss mask of the step, ``tasks.fit``, JRT-RNN's prefix per setting."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recurrent_lm import models
from recurrent_lm import training
from recurrent_lm.data import synthetic
from recurrent_lm.evaluation import recall
from recurrent_lm.training import step as step_lib
from recurrent_lm.training import tasks
from tests.layers._util import assert_close

V = 32


def _config(mixer: str = "attention", **kwargs) -> models.ModelConfig:
  spec = {"attention": (("max_len", 64), ("num_heads", 2)),
          "jrt": (("feature_dim", 4), ("num_heads", 2), ("prefix_len", 4))}[mixer]
  conv = models.MixerSpec("base_conv", (("expand", 1), ("kernel_size", 3)))
  return models.ModelConfig(vocab_size=V, d_model=32, num_layers=2, mlp="none", norm="rmsnorm",
                            positions="none", max_len=64,
                            layout=(conv, models.MixerSpec(mixer, spec)), **kwargs)


def _mqar(kv: int, n: int, seed: int, length: int = 16) -> synthetic.InMemorySource:
  return synthetic.InMemorySource(synthetic.MQARSource(synthetic.MQARConfig(V, length, kv), n, seed))


def _validator(config, source):
  """``params -> token accuracy`` on every example of ``source``."""
  predict = recall.make_predict(models.build(tasks.for_context(config, tasks.context_len(source))))
  batches = list(synthetic.task_dataset(source, batch_size=32, num_epochs=1, shuffle=False))
  return lambda params: recall.accuracy((b, predict(params, b)) for b in batches)["accuracy"]


def test_the_step_scores_only_the_loss_mask():
  """The step's loss and gradient equal the masked mean cross-entropy computed by hand."""
  seed = int(np.random.default_rng().integers(1 << 30))
  batch = next(iter(synthetic.task_dataset(_mqar(3, 16, seed), batch_size=8, seed=seed)))
  batch = {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "segment_ids", "loss_mask")}
  model = models.build(_config())
  optimizer = optax.sgd(1.0)
  state = nn.meta.unbox(training.init_state(model, optimizer, (1, 1), seed=seed % 97))

  def by_hand(params):
    logits, _ = model.apply({"params": params}, batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.sum(mask)
  loss, grads = jax.value_and_grad(by_hand)(state.params)
  new_state, metrics = jax.jit(step_lib.make_train_step(model, optimizer))(state, batch)
  assert float(metrics["tokens"]) == 8 * 3           # n queries per example, nothing else
  assert_close(metrics["loss"], loss, 1e-5, f"loss (seed {seed})")
  expected = jax.tree_util.tree_map(lambda p, g: p - g, state.params, grads)
  for got, want in zip(jax.tree_util.tree_leaves(new_state.params),
                       jax.tree_util.tree_leaves(expected)):
    assert_close(got, want, 1e-5, f"SGD update (seed {seed})")


def test_a_prefix_model_scores_the_mask_after_its_prefix_only():
  seed = int(np.random.default_rng().integers(1 << 30))
  batch = next(iter(synthetic.task_dataset(_mqar(3, 8, seed), batch_size=8, seed=seed)))
  config = tasks.for_context(_config("jrt"), 6)      # the 3 pairs are the prefix
  _, next_mask, mlm_mask = step_lib.loss_masks(config, batch, jax.random.key(seed))
  np.testing.assert_array_equal(np.asarray(next_mask), batch["loss_mask"])  # queries follow it
  assert np.all(np.asarray(mlm_mask)[:, 6:] == 0)


def test_for_context_sets_the_prefix_of_jrt_layers_only():
  assert models.prefix_len(tasks.for_context(_config("jrt"), 12)) == 12
  plain = _config()
  assert tasks.for_context(plain, 12) is plain


def test_fit_learns_mqar_and_stops_at_the_target():
  """Attention learns 2-pair MQAR on 32 tokens well above chance (1/16) in 300 steps."""
  train = [_mqar(2, 2000, seed=1)]
  val = [_mqar(2, 128, seed=2)]
  validate = _validator(_config(), val[0])
  result = tasks.fit(_config(), train, validate=validate, steps=300, batch_size=32, lr=3e-3,
                     eval_every=50, target_accuracy=0.9, progress=False)
  steps, losses, accuracies = zip(*result.history)
  assert losses[-1] < losses[0] - 1.0, result.history
  assert result.val_accuracy > 0.5, result.history
  assert result.val_accuracy == accuracies[-1] and result.steps == steps[-1]
  if result.val_accuracy >= 0.9:
    assert result.steps < 300 or steps[-1] == 300
  # The returned parameters are the ones last validated.
  assert validate(result.params) == pytest.approx(result.val_accuracy)


def test_fit_stops_at_the_first_check_reaching_the_target():
  checks = []
  result = tasks.fit(_config(), [_mqar(2, 64, 1)], validate=lambda p: checks.append(p) or 0.5,
                     steps=50, batch_size=8, lr=1e-3, eval_every=5, target_accuracy=0.5,
                     progress=False)
  assert result.steps == 5 and len(result.history) == 1 and len(checks) == 1


def test_fit_trains_jrt_rnn_with_a_prefix_per_setting():
  train = [_mqar(2, 64, 1), _mqar(4, 64, 3, length=24)]     # prefixes 4 and 8
  result = tasks.fit(_config("jrt"), train, validate=lambda p: 0.0, steps=4, batch_size=8,
                     lr=1e-3, eval_every=2, progress=False)
  assert result.steps == 4 and np.isfinite(result.history[-1][1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), r"steps=0; expected a positive int"),
])
def test_fit_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tasks.fit(_config(), [_mqar(2, 8, 1)], validate=lambda p: 0.0, batch_size=4, lr=1e-3,
              **kwargs)
  with pytest.raises(ValueError, match="no train sources; expected at least one"):
    tasks.fit(_config(), [], validate=lambda p: 0.0, steps=1, batch_size=4, lr=1e-3)
