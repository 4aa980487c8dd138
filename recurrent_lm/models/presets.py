"""Named model configs: the Languini sizes for a GPT and a qLSTM, and CPU sizes.

Languini Kitchen compares a GPT (learned positions, GELU MLP of width 4·D,
pre-LayerNorm) and a quasi-LSTM (the same blocks with the attention replaced
by a multi-head qLSTM) at four sizes (layers / width / heads):

    mini 4/512/8    tiny 4/768/12    small 12/768/12    medium 24/1024/16

As in the Languini reference the qLSTM's cells are ``heads × 64`` wide,
except mini's ``8 × 32 = 256`` (half its width).
``cpu_tiny`` (2/64/2) and ``cpu_small`` (4/128/4) are for tests and CPU demos.
Preset names are ``<family>_<size>``, e.g. ``gpt_small`` or ``qlstm_cpu_small``.

BASED (Arora et al., 2024) is a hybrid layout: mostly BaseConv layers, with
Taylor linear attention (d′ = 16) and sliding-window attention (w = 256, rotary)
in between, SwiGLU MLPs of width 2·D and RMSNorm. ``based_360m`` follows the
paper's 360M model: 27 layers of width 1024, 16 heads, linear attention at
layers 1, 6, 11, 16, 21 and the window at 2, 7, 12, 17, 22 (one period: the
27 layers do not repeat). ``based_cpu_small`` repeats the period of five
(conv, linear attention, window, conv, conv) at width 128, window 64.
JRT-RNN (``jrt_cpu_small``, ``jrt_360m``) is the BASED layout with its linear
attention read as a prefix (``jrt``: encoder projections, non-causal over the
first M = max_len / 2 tokens, the paper's 1024 of 2048).
``liger_cpu_small`` is ``gpt_cpu_small`` linearised (Liger Attention:
½ window of 64 + ½ gated linear attention on the same q/k/v), as
:mod:`~recurrent_lm.models.linearize` builds from a trained GPT, here to
train from scratch. ``h3_cpu_small`` is H3's hybrid at CPU size: H3 layers
(d_state 64, heads of width 1 as in the reference) with softmax attention at
the second layer, GELU MLPs and LayerNorm as in the H3 LMs.
``mamba_cpu_small``, ``mamba2_cpu_small`` and ``xlstm_cpu_small`` (xLSTM[3:1])
are CPU sizes of Mamba (S6) and xLSTM; ``gla_cpu_small`` (GLA layers, 4 heads, SwiGLU MLPs as in
the GLA paper's LMs) and ``mlstm_cpu_small`` (xLSTM 7B's blocks: mLSTM and
SwiGLU, no sLSTM) complete Languini-style comparisons of the gated recurrences.

The memory and routing family at CPU size: ``titans_mal_cpu_small`` (Titans
MAL: neural memory then a 64-token window, alternating),
``titans_mag_cpu_small`` (MAG: window gated by the memory),
``titans_mac_cpu_small`` (MAC: attention over persistent tokens, the memory's
retrieval and the segment, 64-token segments),
``moneta_/yaad_/memora_cpu_small`` (the Miras models: their memory in every
layer), ``moe_cpu_small`` / ``rmoe_cpu_small`` (``gpt_cpu_small`` with 8
SwiGLU experts, top-2, routed per layer or by RMoE's GRU over depth) and
``ngram_cpu_small`` (qLSTM layers with an n-gram head of orders 1–3 as the
second layer, as ICLL's hybrids put it after a first regular layer).
``hmt_cpu_small`` is HMT around ``qlstm_cpu_small`` (an ``HMTConfig``, see
:func:`recurrent_lm.models.hmt.hmt_cpu_small`).
"""

from __future__ import annotations

import dataclasses

from recurrent_lm.models import hmt, linearize
from recurrent_lm.models.lm import MixerSpec, ModelConfig

SIZES: dict[str, tuple[int, int, int]] = {   # layers, width, heads
    "cpu_tiny": (2, 64, 2),
    "cpu_small": (4, 128, 4),
    "mini": (4, 512, 8),
    "tiny": (4, 768, 12),
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
}
FAMILIES = ("gpt", "qlstm")
BASED_SIZES = ("cpu_small", "360m")
# Further architectures at the CPU size (width 128, 4 heads).
CPU_FAMILIES = ("mamba", "mamba2", "gla", "mlstm", "xlstm", "liger", "h3", "titans_mal",
                "titans_mag", "titans_mac", "moneta", "yaad", "memora", "moe", "rmoe", "ngram",
                "hmt")
SEQ_LEN = 512          # Languini's training length; the GPT's position table.
VOCAB_SIZE = 16384     # Languini's sentencepiece vocabulary.


def names() -> tuple[str, ...]:
  return (tuple(f"{family}_{size}" for family in FAMILIES for size in SIZES)
          + tuple(f"{family}_{size}" for family in ("based", "jrt") for size in BASED_SIZES)
          + tuple(f"{family}_cpu_small" for family in CPU_FAMILIES))


def _cpu_family(family: str, vocab_size: int, max_len: int) -> ModelConfig:
  """``mamba``/``mamba2``: 4 Mamba (S6) / Mamba-2 layers, no MLP (a Mamba block
  is the mixer alone).
  ``xlstm``: xLSTM[3:1] — three mLSTM layers then an sLSTM, SwiGLU MLPs of
  width 8/3·D and logits soft-capped at 30 as in xLSTM 7B."""
  memory = (("chunk_size", 16), ("num_heads", 4))
  if family == "titans_mal":
    window = MixerSpec("sliding_window", (("num_heads", 4), ("rope_theta", 10_000.0),
                                          ("window", 64)))
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(MixerSpec("titans", memory), window), mlp="swiglu",
                       norm="rmsnorm", max_len=max_len)
  if family == "titans_mag":
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(MixerSpec("titans_mag", memory + (("window", 64),)),),
                       mlp="swiglu", norm="rmsnorm", max_len=max_len)
  if family == "titans_mac":
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(MixerSpec("titans_mac", (("chunk_size", 64), ("num_heads", 4))),),
                       mlp="swiglu", norm="rmsnorm", max_len=max_len)
  if family in ("moneta", "yaad", "memora"):
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(MixerSpec(family, memory),), mlp="swiglu", norm="rmsnorm",
                       max_len=max_len)
  if family in ("moe", "rmoe"):
    gpt = get("gpt_cpu_small", vocab_size, max_len)
    return dataclasses.replace(gpt, mlp="moe", num_experts=8, top_k=2,
                               router="recurrent" if family == "rmoe" else "linear",
                               router_dim=64)
  if family == "ngram":
    qlstm = MixerSpec("qlstm", (("head_dim", 32), ("num_heads", 4)))
    ngram = MixerSpec("ngram", (("max_len", max_len), ("orders", (1, 2, 3))))
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(qlstm, ngram, qlstm, qlstm), mlp="gelu", norm="layernorm",
                       max_len=max_len)
  if family == "hmt":
    return hmt.hmt_cpu_small(vocab_size, max_len)
  if family == "liger":
    return linearize.liger_config(get("gpt_cpu_small", vocab_size, max_len), lora_rank=0)
  if family == "h3":
    h3 = MixerSpec("h3", (("d_state", 64),))
    attention = MixerSpec("attention", (("max_len", max_len), ("num_heads", 4)))
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(h3, attention, h3, h3), mlp="gelu", norm="layernorm",
                       positions="none", max_len=max_len)
  if family == "mamba2":
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(MixerSpec("mamba2", (("d_state", 64), ("head_dim", 32))),),
                       mlp="none", norm="rmsnorm", max_len=max_len)
  if family == "gla":
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(MixerSpec("gla", (("num_heads", 4),)),), mlp="swiglu",
                       norm="rmsnorm", max_len=max_len)
  if family == "mlstm":
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(MixerSpec("mlstm", (("num_heads", 4),)),), mlp="swiglu",
                       norm="rmsnorm", logit_softcap=30.0, max_len=max_len)
  if family == "mamba":
    return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                       layout=(MixerSpec("mamba", (("d_state", 16),)),), mlp="none",
                       norm="rmsnorm", max_len=max_len)
  mlstm = MixerSpec("mlstm", (("num_heads", 4),))
  return ModelConfig(vocab_size=vocab_size, d_model=128, num_layers=4,
                     layout=(mlstm, mlstm, mlstm, MixerSpec("slstm", (("num_heads", 4),))),
                     mlp="swiglu", norm="rmsnorm", logit_softcap=30.0, max_len=max_len)


def _based(size: str, vocab_size: int, max_len: int, prefix: bool = False) -> ModelConfig:
  """BASED's layout; with ``prefix`` JRT-RNN's (prefix linear attention)."""
  d_model, heads, window, num_layers = ((128, 4, 64, 5) if size == "cpu_small"
                                        else (1024, 16, 256, 27))
  conv = MixerSpec("base_conv", (("expand", 4), ("kernel_size", 3)))
  linear = (MixerSpec("jrt", (("feature_dim", 16), ("num_heads", heads),
                              ("prefix_len", max(max_len // 2, 1))))
            if prefix else MixerSpec("based", (("feature_dim", 16), ("num_heads", heads))))
  sliding = MixerSpec("sliding_window", (("num_heads", heads), ("rope_theta", 10_000.0),
                                         ("window", window)))
  period = [conv, linear, sliding, conv, conv]
  layout = period if size == "cpu_small" else [
      linear if i % 5 == 1 and i < 25 else sliding if i % 5 == 2 and i < 25 else conv
      for i in range(num_layers)]
  return ModelConfig(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                     layout=tuple(layout), mlp="swiglu", mlp_hidden_dim=2 * d_model,
                     norm="rmsnorm", positions="none", max_len=max_len)


def get(name: str, vocab_size: int = VOCAB_SIZE,
        max_len: int = SEQ_LEN) -> "ModelConfig | hmt.HMTConfig":
  """The preset ``name`` (see :func:`names`) for ``vocab_size`` tokens."""
  family, _, size = name.partition("_")
  if name.endswith("_cpu_small") and name[:-len("_cpu_small")] in CPU_FAMILIES:
    return _cpu_family(name[:-len("_cpu_small")], vocab_size, max_len)
  if family in ("based", "jrt") and size in BASED_SIZES:
    return _based(size, vocab_size, max_len, prefix=family == "jrt")
  if family not in FAMILIES or size not in SIZES:
    raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(names())}")
  num_layers, d_model, num_heads = SIZES[size]
  if family == "gpt":
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
        layout=(MixerSpec("attention", (("max_len", max_len), ("num_heads", num_heads))),),
        mlp="gelu", norm="layernorm", positions="learned", max_len=max_len)
  head_dim = 32 if size == "mini" else d_model // num_heads
  return ModelConfig(
      vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
      layout=(MixerSpec("qlstm", (("head_dim", head_dim), ("num_heads", num_heads))),),
      mlp="gelu", norm="layernorm", positions="none", max_len=max_len)
