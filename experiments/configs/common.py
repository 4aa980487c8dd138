"""The run config shared by every training config file.

A run config has five sections::

    model      the ModelConfig fields (layout = list of {"mixer": name, ...})
    data       corpus, data_dir, vocab_size, seq_len, batch_size (global), seed
    train      steps | time_budget_s, log/checkpoint cadence, accum_steps, seed,
               mlm_weight/mlm_prob (JRT's masked-LM loss; models with a prefix only),
               init_from (a run whose parameters start this one, by path)
    optimizer  AdamW + warm-up/cosine (Languini: Adam(0.9, 0.95), 6e-4 → 6e-6, 200 warm-up),
               trainable (a regex of the parameters trained; empty for all)
    mesh       data, fsdp, tensor, sequence axis sizes (-1: the devices left)
    eval       split, mode, stride, batch_size, max_tokens (0: the whole split)

``model.vocab_size`` follows ``data.vocab_size`` and a GPT's ``model.max_len``
follows ``data.seq_len`` (shared references), so ``--config.data.vocab_size=…``
changes both.
"""

from ml_collections import config_dict

from recurrent_lm.models import presets


def run_config(preset: str, *, vocab_size: int = presets.VOCAB_SIZE,
               seq_len: int = presets.SEQ_LEN, batch_size: int = 16) -> config_dict.ConfigDict:
  """The config of training ``preset`` (a ``recurrent_lm.models.presets`` name)."""
  vocab = config_dict.FieldReference(vocab_size)
  length = config_dict.FieldReference(seq_len)
  model = presets.get(preset, vocab_size=vocab_size, max_len=seq_len).to_dict()
  # HMT's backbone runs one segment at a time: its own max_len stays.
  lm = model["backbone"] if "backbone" in model else model
  lm["vocab_size"] = vocab
  if lm is model:
    model["max_len"] = length
  lm["logit_softcap"] = config_dict.placeholder(float)
  lm["mlp_hidden_dim"] = config_dict.placeholder(int)

  config = config_dict.ConfigDict()
  config.model = model
  config.data = dict(corpus="default", data_dir="", vocab_size=vocab, seq_len=length,
                     batch_size=batch_size, seed=0)
  config.train = dict(steps=0, time_budget_s=0.0, log_every=10, checkpoint_every=200,
                      keep_checkpoints=3, accum_steps=1, seed=0,
                      mlm_weight=0.25, mlm_prob=0.15, init_from="")
  config.optimizer = dict(peak_lr=6e-4, end_lr=6e-6, warmup_steps=200, b1=0.9, b2=0.95,
                          eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, trainable="")
  config.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  config.eval = dict(split="test", mode="auto", stride=128, batch_size=8, max_tokens=0)
  return config
