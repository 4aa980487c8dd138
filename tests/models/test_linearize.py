"""GPT → Liger conversion: the config swap and the parameter copy."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm.models import presets
from recurrent_lm.models.lm import LanguageModel, MixerSpec
from recurrent_lm.models.linearize import liger_config, liger_params, lora_mask

VOCAB, MAX_LEN = 64, 32


@functools.lru_cache(maxsize=None)
def _gpt_boxed():
  config = presets.get("gpt_cpu_tiny", vocab_size=VOCAB, max_len=MAX_LEN)
  tokens = jnp.zeros((1, 4), jnp.int32)
  return config, jax.jit(LanguageModel(config).init)(jax.random.key(0), tokens)


def _gpt(boxed=False):
  """gpt_cpu_tiny (2 layers, width 64, 2 heads) and its params, shared by the tests."""
  config, params = _gpt_boxed()
  return config, params if boxed else nn.meta.unbox(params)


def _paths(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def test_config_swaps_every_attention_slot_and_keeps_the_rest():
  gpt, _ = _gpt()
  config = liger_config(gpt, window=16, lora_rank=4)
  assert config.layout == (MixerSpec("liger_attention", (
      ("lora_alpha", 8.0), ("lora_rank", 4), ("num_heads", 2), ("window", 16))),)
  assert (config.d_model, config.num_layers, config.mlp, config.positions, config.max_len) == (
      gpt.d_model, gpt.num_layers, gpt.mlp, gpt.positions, gpt.max_len)
  gla = liger_config(gpt, mixer="liger_gla", lora_rank=0)
  assert gla.layout == (MixerSpec("liger_gla", (
      ("lora_alpha", 8.0), ("lora_rank", 0), ("num_heads", 2))),)


def test_config_refuses_a_layout_without_attention_and_an_unknown_mixer():
  with pytest.raises(ValueError, match="no 'attention' slot"):
    liger_config(presets.get("qlstm_cpu_tiny", vocab_size=VOCAB))
  with pytest.raises(ValueError, match="mixer='gla'; expected one of"):
    liger_config(presets.get("gpt_cpu_tiny", vocab_size=VOCAB), mixer="gla")


@pytest.mark.parametrize("mixer", ["liger_attention", "liger_gla"])
def test_every_gpt_param_is_carried_over_unchanged_and_only_lora_is_new(mixer):
  gpt, gpt_params = _gpt()
  config = liger_config(gpt, mixer=mixer, window=8, lora_rank=4)
  params = liger_params(gpt_params, config, jax.random.key(1))
  # The tree is exactly the Liger model's.
  expected = nn.meta.unbox(jax.eval_shape(LanguageModel(config).init, jax.random.key(0),
                                          jnp.zeros((1, 4), jnp.int32)))
  assert (jax.tree_util.tree_structure(params)
          == jax.tree_util.tree_structure(expected))
  old, new = _paths(gpt_params), _paths(params)
  for path, leaf in old.items():
    np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(leaf), err_msg=path)
  added = set(new) - set(old)
  assert added and all("lora" in path for path in added)
  # q/k/v of every layer: A random, B zero (stacked on the layers axis).
  assert len(added) == 3 * 2
  for path in added:
    if "['b']" in path:
      assert not np.any(np.asarray(new[path])), path
    else:
      assert np.std(np.asarray(new[path])) > 0, path
  mask = _paths(lora_mask(params))
  assert {path for path, selected in mask.items() if selected} == added


def test_converted_model_with_lora_at_init_equals_the_model_without_lora():
  gpt, gpt_params = _gpt()
  with_lora = liger_config(gpt, window=4, lora_rank=8)
  without = liger_config(gpt, window=4, lora_rank=0)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (2, 12)), jnp.int32)
  logits_lora, _ = jax.jit(LanguageModel(with_lora).apply)(
      liger_params(gpt_params, with_lora, jax.random.key(1)), tokens)
  logits, _ = jax.jit(LanguageModel(without).apply)(
      liger_params(gpt_params, without, jax.random.key(1)), tokens)
  np.testing.assert_allclose(np.asarray(logits_lora), np.asarray(logits), rtol=0, atol=1e-6)
  assert np.isfinite(np.asarray(logits)).all()


def test_params_that_do_not_fit_are_refused():
  gpt, gpt_params = _gpt()
  narrower = liger_config(presets.get("gpt_cpu_tiny", vocab_size=VOCAB + 1), lora_rank=2)
  with pytest.raises(ValueError, match=r"parameter params/embedding is float32\[64, 64\]"):
    liger_params(gpt_params, narrower, jax.random.key(1))


def test_boxed_params_convert_to_boxed_params_with_liger_axis_names():
  gpt, boxed = _gpt(boxed=True)
  config = liger_config(gpt, lora_rank=4)
  params = liger_params(boxed, config, jax.random.key(1))
  mixer = params["params"]["layers"]["block_0"]["mixer"]
  assert isinstance(mixer["q_proj"]["kernel"], nn.LogicallyPartitioned)
  assert mixer["q_proj"]["kernel"].names == ("layers", "embed", "heads", "head_dim")
  assert mixer["q_proj_lora"]["a"]["kernel"].names == ("layers", "embed", None)
  # The same values as an unboxed conversion (the jitted LoRA init is reused).
  unboxed = liger_params(_gpt()[1], config, jax.random.key(1))
  jax.tree_util.tree_map(np.testing.assert_array_equal, nn.meta.unbox(params), unboxed)
