"""Named model configs: the Languini sizes for a GPT and a qLSTM, and CPU sizes.

Languini Kitchen compares a GPT (learned positions, GELU MLP of width 4·D,
pre-LayerNorm) and a quasi-LSTM (the same blocks with the attention replaced
by a multi-head qLSTM) at four sizes (layers / width / heads):

    mini 4/512/8    tiny 4/768/12    small 12/768/12    medium 24/1024/16

As in the Languini reference the qLSTM's cells are ``heads × 64`` wide,
except mini's ``8 × 32 = 256`` (half its width).
``cpu_tiny`` (2/64/2) and ``cpu_small`` (4/128/4) are for tests and CPU demos.
Preset names are ``<family>_<size>``, e.g. ``gpt_small`` or ``qlstm_cpu_small``.
"""

from __future__ import annotations

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
SEQ_LEN = 512          # Languini's training length; the GPT's position table.
VOCAB_SIZE = 16384     # Languini's sentencepiece vocabulary.


def names() -> tuple[str, ...]:
  return tuple(f"{family}_{size}" for family in FAMILIES for size in SIZES)


def get(name: str, vocab_size: int = VOCAB_SIZE, max_len: int = SEQ_LEN) -> ModelConfig:
  """The preset ``name`` (see :func:`names`) for ``vocab_size`` tokens."""
  family, _, size = name.partition("_")
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
