"""The train step, the optimizer, sharding and the loop's contract with its work directory."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from recurrent_lm import models
from recurrent_lm import training
from recurrent_lm.training import loop
from tests.layers._util import assert_close
from tests.training.conftest import ENV, REPO, VOCAB, smoke_config

OPTIMIZER = dict(peak_lr=1e-3, end_lr=1e-5, warmup_steps=10, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.1, grad_clip_norm=1.0)


def _model():
  return models.LanguageModel(models.presets.get("qlstm_cpu_tiny", vocab_size=VOCAB))


def _batch(seed, batch=4, length=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (batch, length + 1))
  segment_ids = np.repeat(rng.integers(1, 3, (batch, 1)), length, axis=1)
  segment_ids[:, length // 2:] += 1            # two documents a row
  segment_ids[0, -3:] = 0                      # padding
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
          "segment_ids": jnp.asarray(segment_ids, jnp.int32)}


def test_learning_rate_warms_up_linearly_then_decays_to_the_end_value():
  schedule = training.learning_rate(OPTIMIZER, 110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5e-3)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(60)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-5)
  assert float(schedule(110)) == pytest.approx(1e-5)


def test_loss_is_the_mean_over_non_padding_tokens():
  model = _model()
  batch = _batch(0)
  optimizer = training.make_optimizer(OPTIMIZER, 100)
  state = nn.meta.unbox(training.init_state(model, optimizer, (1, 1), seed=0))
  _, metrics = jax.jit(training.make_train_step(model, optimizer))(state, batch)
  logits, _ = model.apply({"params": state.params}, batch["inputs"],
                          segment_ids=batch["segment_ids"])
  logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
  nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["segment_ids"]) > 0
  assert float(metrics["tokens"]) == mask.sum()
  assert float(metrics["loss"]) == pytest.approx(nll[mask].mean(), rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
  model = _model()
  batch = _batch(1)
  optimizer = training.make_optimizer(OPTIMIZER, 100)
  results = []
  for accum in (1, 2, 4):
    state = nn.meta.unbox(training.init_state(model, optimizer, (1, 1), seed=0))
    step = jax.jit(training.make_train_step(model, optimizer, accum_steps=accum))
    results.append(step(state, batch))
  for state, metrics in results[1:]:
    assert_close(metrics["loss"], results[0][1]["loss"], rtol=1e-6, what="loss")
    assert_close(metrics["grad_norm"], results[0][1]["grad_norm"], rtol=1e-5, what="grad norm")
    jax.tree_util.tree_map(lambda a, b: assert_close(a, b, rtol=1e-5, what="params"),
                           state.params, results[0][0].params)


def test_bfloat16_compute_keeps_float32_params_and_a_close_loss():
  batch = _batch(2)
  optimizer = training.make_optimizer(OPTIMIZER, 100)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = models.presets.get("qlstm_cpu_tiny", vocab_size=VOCAB)
    model = models.LanguageModel(models.ModelConfig.from_dict({**config.to_dict(), "dtype": dtype}))
    state = nn.meta.unbox(training.init_state(model, optimizer, (1, 1), seed=0))
    state, metrics = jax.jit(training.make_train_step(model, optimizer))(state, batch)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(state.params))
    losses[dtype] = float(metrics["loss"])
  assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


_SHARDED = r"""
import jax, numpy as np, flax.linen as nn
from recurrent_lm import models, training
from recurrent_lm.training import loop
from tests.training.test_train import OPTIMIZER, _batch
from experiments.configs import smoke
config = smoke.get_config()
config.data.vocab_size = 512
config.optimizer.update(OPTIMIZER)
model = models.LanguageModel(training.model_config(config))
batch = {k: np.asarray(v) for k, v in _batch(3, batch=8).items()}
results = {}
for axes in [dict(data=1), dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(sequence=8),
             dict(data=2, sequence=4)]:
  devices = jax.devices()[:int(np.prod(list(axes.values())))]
  mesh = training.make_mesh(**{"data": -1, **{k: v for k, v in axes.items() if k != "data"}},
                            devices=devices)
  _, init_fn, step_fn, _ = loop._build(config, model, mesh, 100)
  state = init_fn()
  sharded = {k: jax.device_put(v, training.batch_sharding(mesh)) for k, v in batch.items()}
  for _ in range(2):
    state, metrics = step_fn(state, sharded)
  leaf = state.params["layers"]["block_0"]["mixer"]["gates"]["kernel"]
  results[str(axes)] = (float(metrics["loss"]), jax.device_get(state.params),
                        len(leaf.sharding.device_set), float(metrics["grad_norm"]))
ref_loss, ref_params, _, ref_norm = results[str(dict(data=1))]
for name, (loss, params, spread, norm) in results.items():
  err = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
            for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)))
  print(name, "loss", loss, "ref", ref_loss, "max rel param err", err, "devices", spread)
  assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), name
  assert abs(norm - ref_norm) <= 1e-5 * abs(ref_norm), name
  assert err <= 1e-4, name
assert results[str(dict(data=2, fsdp=2, tensor=2))][2] == 8
print("OK")
"""


def test_a_step_on_8_simulated_devices_equals_one_device():
  """Mesh (data=8) and (data=2, fsdp=2, tensor=2) vs one device, two steps.

  Loss and gradient norm agree to 1e-5 (the all-reduce sums in another order);
  parameters to 1e-4 of their largest magnitude, because Adam divides every
  gradient entry by its own running magnitude, which magnifies summation-order
  noise in entries whose gradient is near zero.
  """
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]


_MOE_SHARDED = """
import jax, numpy as np
from recurrent_lm import models, training
from recurrent_lm.training import loop
from tests.training.test_train import OPTIMIZER, _batch
from experiments.configs import smoke
config = smoke.get_config()
config.data.vocab_size = 512
config.optimizer.update(OPTIMIZER)
config.model.update(mlp="moe", num_experts=4, top_k=2, router="recurrent", router_dim=16,
                    mlp_hidden_dim=64, load_balance_coef=1e-2)
model = models.LanguageModel(training.model_config(config))
batch = {k: np.asarray(v) for k, v in _batch(3, batch=8).items()}
results = {}
for axes in [dict(data=1), dict(data=4, tensor=2)]:   # tensor=2: the qLSTM has 2 heads
  devices = jax.devices()[:int(np.prod(list(axes.values())))]
  mesh = training.make_mesh(**{"data": -1, **{k: v for k, v in axes.items() if k != "data"}},
                            devices=devices)
  _, init_fn, step_fn, _ = loop._build(config, model, mesh, 100)
  state = init_fn()
  sharded = {k: jax.device_put(v, training.batch_sharding(mesh)) for k, v in batch.items()}
  state, metrics = step_fn(state, sharded)
  kernel = state.params["layers"]["block_0"]["mlp"]["gate_proj"]["kernel"]
  shard_shape = kernel.sharding.shard_shape(kernel.shape)
  results[str(axes)] = (float(metrics["loss"]), float(metrics["load_balance_loss"]),
                        kernel.shape, shard_shape)
ref = results[str(dict(data=1))]
got = results[str(dict(data=4, tensor=2))]
print(ref, got)
assert abs(got[0] - ref[0]) <= 1e-5 * abs(ref[0])
assert abs(got[1] - ref[1]) <= 1e-5 * abs(ref[1])
layers_, experts, d, f = got[2]
assert got[3] == (layers_, experts // 2, d, f), got   # experts split 2 ways, each one whole
print("OK")
"""


def test_moe_experts_shard_over_the_tensor_axis_and_the_step_equals_one_device():
  """Mesh (data=4, tensor=2): each device holds 2 of the 4 experts whole; the
  loss and load-balance loss of a step agree with one device to 1e-5."""
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", _MOE_SHARDED], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]


def test_a_run_writes_its_config_metrics_tensorboard_and_summary(corpus, tmp_path):
  workdir = tmp_path / "run"
  config = smoke_config(corpus, steps=6, log_every=2, checkpoint_every=3)
  summary = training.train(config, str(workdir))
  stored = training.load_config(str(workdir))
  assert training.model_config(stored) == training.model_config(config)
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [2, 4, 6]
  for line in lines:
    assert {"loss", "perplexity", "tokens_per_s", "mfu", "bits_per_byte",
            "byte_perplexity", "learning_rate", "grad_norm"} <= set(line)
    assert line["perplexity"] == pytest.approx(np.exp(line["loss"]))
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and b"train/loss" in events[0].read_bytes()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]
  assert summary["steps"] == 6 and summary["tokens_seen"] == 6 * 8 * 64
  assert json.loads((workdir / "summary.json").read_text()) == summary


def test_a_time_budget_becomes_the_step_count_languini_style(corpus, tmp_path, monkeypatch):
  config = smoke_config(corpus, steps=0, time_budget_s=0.5, log_every=1, checkpoint_every=100)
  seconds = training.step_seconds(config, warmup=1, repeats=3)
  assert 0 < seconds < 5
  # The run times its step the same way and keeps budget / seconds steps.
  monkeypatch.setattr(loop, "step_seconds", lambda *args, **kwargs: 0.125)
  summary = training.train(config, str(tmp_path / "run"))
  assert summary["steps"] == 4 and training.load_config(str(tmp_path / "run")).train.steps == 4


def test_a_workdir_of_another_config_is_refused_and_left_alone(corpus, tmp_path):
  workdir = tmp_path / "run"
  training.train(smoke_config(corpus, steps=2, checkpoint_every=2), str(workdir))
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  other = smoke_config(corpus, steps=2, checkpoint_every=2)
  other.model.d_model = 32
  with pytest.raises(ValueError, match=r"holds a run of a different config \(model.d_model: 64 -> 32"):
    training.train(other, str(workdir))
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_a_non_empty_directory_without_a_run_is_refused(corpus, tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="is not empty and holds no config.json"):
    training.train(smoke_config(corpus, steps=2), str(tmp_path))
  assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _bad(config, field, value):
  section, name = field.split(".", 1)
  if section == "model" and name.startswith("layout"):
    config.model.layout = value
  else:
    setattr(config[section], name, value)
  return config


@pytest.mark.parametrize("field, value, message", [
    ("model.layout", [{"mixer": "lstm", "num_heads": 2}], "unknown mixer 'lstm'; expected one of"),
    ("model.layout", [{"mixer": "qlstm", "num_heads": 3}], "d_model=64 is not divisible by num_heads=3"),
    ("data.seq_len", 0, r"data.seq_len=0; expected a positive int"),
    ("data.seq_len", -5, r"data.seq_len=-5; expected a positive int"),
    ("train.accum_steps", 3, "data.batch_size=8 is not divisible by train.accum_steps=3"),
])
def test_bad_config_is_one_clear_line_and_writes_nothing(corpus, tmp_path, field, value, message):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message) as error:
    training.train(_bad(smoke_config(corpus, steps=2), field, value), str(workdir))
  assert "\n" not in str(error.value)
  assert not workdir.exists()


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no .txt or .jsonl files"),
    (lambda d: (d / "a.txt").write_bytes(b"\xff\xfe\x00binary\x00"), "not UTF-8"),
])
def test_empty_or_non_text_corpus_is_one_clear_line(corpus, tmp_path, make, message):
  source = tmp_path / "texts"
  source.mkdir()
  make(source)
  config = smoke_config(corpus, steps=2)
  config.data.corpus = str(source)
  with pytest.raises(ValueError, match=message):
    training.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_token_ids_outside_the_vocabulary_are_refused_on_the_host():
  batch = {k: np.array(v) for k, v in _batch(4).items()}
  config = ml_collections.ConfigDict({"data": {"batch_size": batch["inputs"].shape[0],
                                               "seq_len": batch["inputs"].shape[1],
                                               "vocab_size": VOCAB}})
  feed = loop._BatchFeed(config, training.batch_sharding(training.make_mesh()))
  assert feed(batch, 0)["inputs"].shape == batch["inputs"].shape
  batch["inputs"][1, 2] = VOCAB
  with pytest.raises(ValueError, match=f"token id {VOCAB} in inputs of batch 7 is outside"):
    feed(batch, 7)


def test_train_script_reports_bad_input_in_one_line_on_stderr(corpus, tmp_path):
  corpus_dir, data_dir = corpus
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / 'run'}",
       f"--config.data.corpus={corpus_dir}", f"--config.data.data_dir={data_dir}",
       f"--config.data.vocab_size={VOCAB}", "--config.data.seq_len=0"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "train.py: error: data.seq_len=0; expected a positive int"]
