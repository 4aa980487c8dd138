"""The language model, its layer layouts, presets and the mixer registry.

    config = models.presets.get("qlstm_mini", vocab_size=16384)
    model = models.LanguageModel(config)
    logits, state = model.apply(params, tokens, state=None, segment_ids=None)
"""

from recurrent_lm.models import hmt, linearize, presets
from recurrent_lm.models.build import build, config_from_dict, prefix_len, state_bytes
from recurrent_lm.models.hmt import HMT, HMTConfig
from recurrent_lm.models.lm import Block, LanguageModel, MixerSpec, ModelConfig, with_mixer_options
from recurrent_lm.models.registry import get_mixer, mixer_names, register_mixer
