"""Flax Linen layers: token mixers, norms and MLPs.

Every token mixer follows one protocol::

    y, new_state = mixer(x, state=None, segment_ids=None)   # x: [B, T, D], any T >= 1
    state = mixer.init_state(batch_size, dtype=None)        # no params needed

``state=None`` starts a sequence; decoding is the same call with ``T == 1``
and the state of the previous call. A state is a pytree of fixed shape, and
``segment_ids`` ``[B, T]`` reset it where a new document starts in a packed
row. Every mixer takes its model width ``d_model`` as its first field, so
``init_state`` works on an unbound module.
"""

from recurrent_lm.layers.attention import Attention
from recurrent_lm.layers.base_conv import BaseConv
from recurrent_lm.layers.gla import GatedLinearAttention
from recurrent_lm.layers.h3 import H3
from recurrent_lm.layers.liger import LigerAttention, LigerGLA
from recurrent_lm.layers.linear_attention import LinearAttention
from recurrent_lm.layers.mamba import Mamba
from recurrent_lm.layers.mamba2 import Mamba2
from recurrent_lm.layers.mlstm import MLSTM
from recurrent_lm.layers import moe
from recurrent_lm.layers.mlp import GeluMLP, SwiGLU
from recurrent_lm.layers.moe import LinearRouter, MoEMLP, RecurrentRouterStep
from recurrent_lm.layers.ngram import NGramHead
from recurrent_lm.layers.norms import GatedRMSNorm, LayerNorm, RMSNorm
from recurrent_lm.layers.prefix_linear_attention import PrefixLinearAttention
from recurrent_lm.layers.qlstm import QLSTM
from recurrent_lm.layers.slstm import SLSTM
from recurrent_lm.layers.titans import NeuralMemory, TitansMAG
from recurrent_lm.layers.titans_mac import TitansMAC
