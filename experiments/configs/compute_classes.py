"""Languini-style compute classes: ``--config=experiments/configs/compute_classes.py:cpu``.

A sweep config names the models, the compute classes and what every run shares::

    models         preset names (``recurrent_lm.models.presets``); an architecture's
                   point at a class is its best preset there (Languini's "best
                   config per class"), so several sizes of one family may be listed
    reference      the family the others are compared with (crossing points)
    class_hours    compute classes in device-hours (Languini: 6, 12, 24, 48, 96)
    hour_seconds   seconds of this device per class hour: 3600 on an accelerator,
                   a few seconds to make a CPU sweep finish
    data, optimizer, eval, mesh   as in ``configs/common.py`` (every run the same)
    train          log/checkpoint cadence of each run
    throughput     Languini's measurement: ``warmup`` untimed then ``repeats`` timed steps

Presets:

* ``cpu``: GPT, qLSTM, BASED, Mamba-2, GLA and mLSTM at the ``cpu_small`` size
  (4 layers, width 128), classes 6/12/24 h at 8 CPU-seconds per hour, the
  default corpus with a 4,096-token vocabulary, 16 × 256-token rows; about
  an hour on the 2-core CPU machine.
* ``languini``: the paper's GPT and qLSTM sizes (mini … medium), classes
  6 … 96 h of real hours, vocabulary 16,384, batch 128 × 512, Adam(0.9, 0.95)
  with cosine 6e-4 → 6e-6 and 200 warm-up steps — for an accelerator.
"""

from ml_collections import config_dict

PRESETS = ("cpu", "languini")


def get_config(preset: str = "cpu") -> config_dict.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"compute-class preset {preset!r}; expected one of {', '.join(PRESETS)}")
  config = config_dict.ConfigDict()
  config.reference = "gpt"
  config.optimizer = dict(peak_lr=6e-4, end_lr=6e-6, warmup_steps=200, b1=0.9, b2=0.95,
                          eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, trainable="")
  config.mesh = dict(data=-1, fsdp=1, tensor=1, sequence=1)
  config.throughput = dict(warmup=2, repeats=5)
  if preset == "cpu":
    config.models = [f"{family}_cpu_small"
                     for family in ("gpt", "qlstm", "based", "mamba2", "gla", "mlstm")]
    config.class_hours = [6.0, 12.0, 24.0]
    config.hour_seconds = 8.0
    config.data = dict(corpus="default", data_dir="", vocab_size=4096, seq_len=256,
                       batch_size=16, seed=0)
    # Width 128 trains faster at a higher peak than Languini's 6e-4 (as in configs/demo.py).
    config.optimizer.update(peak_lr=3e-3, end_lr=3e-5)
    config.eval = dict(split="test", mode="auto", stride=128, batch_size=16, max_tokens=65_536)
    config.train = dict(log_every=10, checkpoint_every=100, keep_checkpoints=2)
  else:
    config.models = [f"{family}_{size}" for family in ("gpt", "qlstm")
                     for size in ("mini", "tiny", "small", "medium")]
    config.class_hours = [6.0, 12.0, 24.0, 48.0, 96.0]
    config.hour_seconds = 3600.0
    config.data = dict(corpus="default", data_dir="", vocab_size=16_384, seq_len=512,
                       batch_size=128, seed=0)
    config.eval = dict(split="test", mode="auto", stride=128, batch_size=32, max_tokens=0)
    config.train = dict(log_every=100, checkpoint_every=1000, keep_checkpoints=2)
  return config
