"""The language model: state passing, packing, scan over layers, options, errors.

Tolerances: float32; logits agree to 1e-4 of their largest magnitude (chunked
and token-by-token summation orders differ).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import models
from tests.layers._util import assert_close, perturb

VOCAB = 97
TIME = 19
BATCH = 2

CONFIGS = {
    "gpt": models.presets.get("gpt_cpu_tiny", vocab_size=VOCAB, max_len=32),
    "qlstm": models.presets.get("qlstm_cpu_tiny", vocab_size=VOCAB),
    # A hybrid layout, scanned over two periods: GLA then a sliding window.
    "hybrid": models.ModelConfig.from_dict(dict(
        vocab_size=VOCAB, d_model=32, num_layers=4, mlp="swiglu", norm="rmsnorm",
        tie_embeddings=True, logit_softcap=30.0,
        layout=[{"mixer": "gla", "num_heads": 2, "chunk_size": 8},
                {"mixer": "sliding_window", "num_heads": 2, "window": 5,
                 "rope_theta": 10_000.0}])),
}


def _based_small():
  """The BASED preset's period at test size: conv, linear attention, window, conv, conv."""
  config = models.presets.get("based_cpu_small", vocab_size=VOCAB).to_dict()
  for spec in config["layout"]:
    if spec["mixer"] == "sliding_window":
      spec["window"] = 5
  return models.ModelConfig.from_dict({**config, "d_model": 32, "mlp_hidden_dim": 64})


CONFIGS["based"] = _based_small()
# The mLSTM preset's blocks (mLSTM + SwiGLU, logits soft-capped) at test size.
CONFIGS["mlstm"] = models.ModelConfig.from_dict(
    {**models.presets.get("mlstm_cpu_small", vocab_size=VOCAB).to_dict(), "d_model": 32,
     "num_layers": 2})


def _tokens(seed, batch=BATCH, time=TIME):
  return jax.random.randint(jax.random.key(seed), (batch, time), 0, VOCAB)


def _setup(name):
  model = models.LanguageModel(CONFIGS[name])
  params = perturb(nn.meta.unbox(model.init(jax.random.key(0), _tokens(0))), scale=0.02)
  return model, params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_whole_equals_pieces_equals_token_by_token(name):
  model, params = _setup(name)
  tokens = _tokens(1)
  apply = jax.jit(model.apply)
  whole, whole_state = apply(params, tokens)
  cuts = np.sort(np.random.default_rng(0).choice(np.arange(1, TIME), 3, replace=False))
  state, pieces = model.init_state(BATCH), []
  for start, stop in zip([0, *cuts], [*cuts, TIME]):
    logits, state = apply(params, tokens[:, start:stop], state)
    pieces.append(logits)
  assert_close(np.concatenate(pieces, axis=1), whole, what="pieces")
  state, steps = model.init_state(BATCH), []
  for t in range(TIME):
    logits, state = apply(params, tokens[:, t:t + 1], state)
    steps.append(logits)
  assert_close(np.concatenate(steps, axis=1), whole, what="token by token")
  np.testing.assert_array_equal(state["position"], whole_state["position"])
  jax.tree_util.tree_map(lambda a, b: assert_close(a, b, what="final state"),
                         state["layers"], whole_state["layers"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_row_equals_documents_one_by_one(name):
  model, params = _setup(name)
  tokens = _tokens(2, batch=1)
  lengths = [7, 1, 11]
  segment_ids = jnp.asarray(np.repeat([3, 4, 9], lengths)[None])
  packed, _ = model.apply(params, tokens, segment_ids=segment_ids)
  start = 0
  for length in lengths:
    alone, _ = model.apply(params, tokens[:, start:start + length])
    assert_close(packed[:, start:start + length], alone, what=f"document at {start}")
    start += length


def test_state_passing_across_a_document_boundary():
  """Pieces with segment ids, the state carried, equal the packed row whole."""
  model, params = _setup("gpt")
  tokens = _tokens(3)
  segment_ids = jnp.asarray(np.repeat([[1, 2]], [8, 11], axis=1).repeat(BATCH, 0))
  whole, _ = model.apply(params, tokens, segment_ids=segment_ids)
  first, state = model.apply(params, tokens[:, :5], model.init_state(BATCH),
                             segment_ids[:, :5])
  second, _ = model.apply(params, tokens[:, 5:], state, segment_ids[:, 5:])
  assert_close(np.concatenate([first, second], axis=1), whole)


def test_layers_are_scanned_with_a_leading_layer_axis():
  config = CONFIGS["hybrid"]
  variables = jax.eval_shape(models.LanguageModel(config).init, jax.random.key(0), _tokens(0))
  specs = nn.get_partition_spec(variables)
  kernel = variables["params"]["layers"]["block_1"]["mixer"]["q_proj"]["kernel"]
  assert kernel.value.shape[0] == config.num_periods == 2
  assert specs["params"]["layers"]["block_1"]["mixer"]["q_proj"]["kernel"][0] == "layers"


def _train_step_hlo(num_layers):
  config = models.presets.get("qlstm_cpu_tiny", vocab_size=VOCAB)
  config = models.ModelConfig.from_dict({**config.to_dict(), "num_layers": num_layers})
  model = models.LanguageModel(config)
  tokens = _tokens(0)
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), tokens)))

  def loss(p):
    logits, _ = model.apply(p, tokens)
    return jnp.mean(logits)
  return jax.jit(jax.grad(loss)).lower(params).as_text()


def test_program_size_does_not_grow_with_depth():
  """nn.scan: a 24-layer model lowers to the same program as a 4-layer one.

  (Compile time follows program size; ``experiments/compile_bench.py`` times it.)
  """
  small, deep = len(_train_step_hlo(4)), len(_train_step_hlo(24))
  assert deep < 1.05 * small, f"HLO grew from {small} to {deep} characters with depth"


def test_remat_changes_neither_loss_nor_gradients():
  config = CONFIGS["hybrid"]
  tokens = _tokens(4)
  results = []
  for remat in (False, True):
    model = models.LanguageModel(models.ModelConfig.from_dict({**config.to_dict(), "remat": remat}))
    params = perturb(nn.meta.unbox(model.init(jax.random.key(0), tokens)), scale=0.02)

    def loss(p):
      logits, _ = model.apply(p, tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  assert_close(results[1][0], results[0][0], what="loss")
  jax.tree_util.tree_map(lambda a, b: assert_close(a, b, rtol=1e-4, what="grad"),
                         results[1][1], results[0][1])


def test_tied_embeddings_and_softcap():
  model, params = _setup("hybrid")
  assert "logits" not in params["params"]
  logits, _ = model.apply(params, _tokens(5))
  assert float(jnp.max(jnp.abs(logits))) < 30.0
  expected = jnp.einsum("btd,vd->btv", jnp.zeros((1, 1, 32)), params["params"]["embedding"])
  assert expected.shape == (1, 1, VOCAB)


def test_bad_token_ids_and_positions_give_nan():
  model, params = _setup("gpt")
  tokens = _tokens(6).at[0, 3].set(VOCAB)
  logits, _ = model.apply(params, tokens)
  assert np.isnan(logits[0, 3]).all() and np.isfinite(logits[1]).all()
  long_tokens = _tokens(7, time=33)       # the position table has 32 rows
  logits, _ = model.apply(params, long_tokens)
  assert np.isnan(logits[:, 32]).all()


@pytest.mark.parametrize("change, message", [
    ({"layout": [{"mixer": "no_such_mixer"}]}, "unknown mixer 'no_such_mixer'"),
    ({"num_layers": 3, "layout": [{"mixer": "qlstm", "num_heads": 2}] * 2},
     "num_layers=3 is not a multiple"),
    ({"d_model": 0}, "model.d_model=0"),
    ({"mlp": "relu"}, "model.mlp='relu'"),
    ({"colour": "blue"}, "unknown model config field"),
])
def test_bad_config_is_one_clear_error(change, message):
  config = {**CONFIGS["qlstm"].to_dict(), **change}
  with pytest.raises(ValueError, match=message):
    models.ModelConfig.from_dict(config)


def test_heads_not_dividing_the_width_is_one_clear_error():
  config = models.ModelConfig.from_dict(
      {**CONFIGS["gpt"].to_dict(), "layout": [{"mixer": "attention", "num_heads": 3}]})
  with pytest.raises(ValueError, match="d_model=64 is not divisible by num_heads=3"):
    jax.eval_shape(models.LanguageModel(config).init, jax.random.key(0), _tokens(0))


def test_registry_names_the_known_mixers():
  assert {"attention", "sliding_window", "linear_attention", "gla", "mamba2",
          "qlstm"} <= set(models.mixer_names())
  assert models.get_mixer("qlstm") is not None
  with pytest.raises(ValueError, match="expected one of attention"):
    models.get_mixer("lstm")


@pytest.mark.parametrize("size", ["mini", "tiny", "small", "medium"])
def test_languini_gpt_sizes_have_12_L_D_squared_block_parameters(size):
  layers_, width, _ = models.presets.SIZES[size]
  config = models.presets.get(f"gpt_{size}")
  variables = jax.eval_shape(models.LanguageModel(config).init, jax.random.key(0),
                             jnp.zeros((1, 1), jnp.int32))
  blocks = sum(int(np.prod(x.shape)) for x in
               jax.tree_util.tree_leaves(nn.meta.unbox(variables)["params"]["layers"]))
  assert abs(blocks / (12 * layers_ * width ** 2) - 1) < 0.01


def test_state_bytes_counts_the_carried_state():
  qlstm = models.presets.get("qlstm_small")           # 12 layers, 12 heads × 64 cells
  assert models.state_bytes(qlstm) == 12 * 12 * 64 * 4 + 4
  gpt = models.presets.get("gpt_mini", max_len=128)    # 4 layers, 8 heads × 64
  per_layer = 2 * 128 * 8 * 64 * 4 + 2 * 128 * 4 + 4   # k, v; slot positions and ids; index
  assert models.state_bytes(gpt) == 4 * per_layer + 4
  assert models.state_bytes(gpt, batch_size=3) == 3 * 4 * (per_layer - 4) + 4 * 4 + 3 * 4


def test_based_360m_follows_the_paper_layout():
  config = models.presets.get("based_360m")
  names = [spec.name for spec in config.layout]
  assert len(names) == config.num_layers == 27 and config.d_model == 1024
  assert [i for i, n in enumerate(names) if n == "based"] == [1, 6, 11, 16, 21]
  assert [i for i, n in enumerate(names) if n == "sliding_window"] == [2, 7, 12, 17, 22]
  assert names.count("base_conv") == 17
  assert config.mlp == "swiglu" and config.hidden_dim == 2048 and config.norm == "rmsnorm"


def test_mixer_options_switch_mamba2_state_collapse_mitigations_on_the_same_params():
  config = models.presets.get("mamba2_cpu_small", vocab_size=VOCAB)
  config = models.ModelConfig.from_dict({**config.to_dict(), "d_model": 32, "num_layers": 2})
  tokens = _tokens(3, time=12)
  params = nn.meta.unbox(models.LanguageModel(config).init(jax.random.key(0), tokens))
  plain, _ = models.LanguageModel(config).apply(params, tokens)
  logits = {r: models.LanguageModel(models.with_mixer_options(config, "mamba2", state_window=r))
            .apply(params, tokens)[0] for r in (3, 12)}
  assert_close(logits[12], plain, 1e-5, "a window as long as the sequence")
  assert float(jnp.max(jnp.abs(logits[3] - plain))) > 1e-3
  with pytest.raises(ValueError, match=r"the layout has no 'gla' slot; its mixers are \['mamba2'\]"):
    models.with_mixer_options(config, "gla", state_window=3)


# The linear router is the simpler path (and trains in tests/training's
# sharded MoE step); it runs in `make test-slow`.
@pytest.mark.parametrize("router", [pytest.param("linear", marks=pytest.mark.slow), "recurrent"])
def test_a_mixture_of_experts_lm_keeps_the_protocol_and_trains_on_its_balance_loss(router):
  from recurrent_lm import training
  config = models.ModelConfig(
      vocab_size=VOCAB, d_model=32, num_layers=3, mlp="moe", num_experts=4, router=router,
      router_dim=16, mlp_hidden_dim=32,
      layout=(models.MixerSpec("qlstm", (("num_heads", 2),)),))
  model = models.LanguageModel(config)
  tokens = _tokens(4, time=10)
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens))
  whole, state = model.apply(params, tokens)
  first, state_1 = model.apply(params, tokens[:, :6])
  rest, _ = model.apply(params, tokens[:, 6:], state_1)
  assert_close(jnp.concatenate([first, rest], 1), whole, 1e-5, "pieces")
  if router == "recurrent":      # one GRU for all layers; per-layer W1, W2 stacked
    assert params["params"]["router_gru"]["hn"]["kernel"].shape == (16, 16)
    assert params["params"]["layers"]["block_0"]["router"]["router_in"]["kernel"].shape == (3, 32, 16)

  optimizer = training.make_optimizer(dict(peak_lr=1e-3, end_lr=1e-5, warmup_steps=1, b1=0.9,
                                           b2=0.95, eps=1e-8, weight_decay=0.0,
                                           grad_clip_norm=0.0), 10)
  train_state = nn.meta.unbox(training.init_state(model, optimizer, (1, 1), seed=0))
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1),
           "segment_ids": jnp.ones(tokens.shape, jnp.int32)}
  _, metrics = jax.jit(training.make_train_step(model, optimizer))(train_state, batch)
  _, sown = model.apply({"params": train_state.params}, tokens, mutable=["moe_aux"])
  balance = sown["moe_aux"]["layers"]["block_0"]["load_balance_loss"]
  assert balance.shape == (3,)
  assert_close(metrics["load_balance_loss"], jnp.mean(balance), 1e-5, "balance loss")
  assert float(metrics["dropped_fraction"]) == 0.0        # dropless without a capacity


def test_the_ngram_head_gets_the_token_ids_at_depth():
  """Second layer of (qLSTM, n-gram): the n-gram mixer is called with the LM's
  token ids (test_ngram checks that it matches on them)."""
  config = models.ModelConfig.from_dict(dict(
      vocab_size=5, d_model=32, num_layers=2, mlp="none", norm="rmsnorm",
      layout=[{"mixer": "qlstm", "num_heads": 2},
              {"mixer": "ngram", "orders": (1, 2), "max_len": 32}]))
  model = models.LanguageModel(config)
  tokens = jax.random.randint(jax.random.key(1), (BATCH, TIME), 0, 5)  # repeats often
  params = perturb(model.init(jax.random.key(0), tokens), scale=0.5)
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, models.get_mixer("ngram")) and context.method_name == "__call__":
      seen.append(kwargs.get("tokens"))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(params, tokens)
  assert seen and all(t is not None and t.shape == tokens.shape for t in seen), seen
