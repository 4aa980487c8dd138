"""Recall-sweep configs: ``python -m experiments.recall_sweep --config=…/recall.py:quick``.

A config names a task, its train / test settings, a grid of models and the
training budget. Models are Zoology's MQAR models: ``num_layers`` blocks, each
a short convolution (BaseConv, kernel 3) then the sequence mixer, no MLP
(``recall_sweep.model_config``). A grid entry is ``arch:d_model:knob`` where
``knob`` is the arch's state-size setting (``recall_sweep.ARCHS``); attention
has none (its state is the KV cache of the sequence).

``quick``  about 15 minutes on a 2-core CPU: MQAR with V = 64, L = 32 and
           2 / 4 / 8 key–value pairs (4000 training examples each); attention, BASED,
           Mamba-2, GLA, mLSTM and qLSTM at two state sizes, JRT-RNN at one (for
           ``jrt_eval``); width 64; lr ∈ {3e-3, 1e-2}; at most 500 steps of 64.
``quick_sd`` set disjointness (V = 64, sets of 4 or 8 and 24 tokens, both orders), the
           same models but JRT-RNN, lr 3e-3, at most 1500 steps.
``quick_icll`` ICLL with shorter examples (10–12 strings of 1–12 letters), the same models;
           accuracy is the DFA acceptance of the greedy next token.
``paper``  BASED's MQAR figure: V = 8192; train (64, 4) 100k, (128, 8), (256, 16/32/64)
           20k each; test (64, 4/8/16), (128, 32), (256, 64), (512, 128), (1024, 256) 1k
           each; BASED d ∈ {48, 64, 128} × d′ ∈ {8, 16, 24}, Mamba d ∈ {64, 128, 256} ×
           d_state ∈ {8, 16, 24}, attention d ∈ {48, 64, 128}; lr ∈ logspace(−3, −1.5, 4).
"""

from ml_collections import config_dict


def _base():
  config = config_dict.ConfigDict()
  config.task = "mqar"
  config.vocab_size = 64
  # MQAR settings: (seq_len, num_kv_pairs, examples).
  config.mqar = dict(train=((32, 2, 4000), (32, 4, 4000), (32, 8, 4000)),
                     validation=((32, 8, 256),),
                     test=((32, 2, 500), (32, 4, 500), (32, 8, 500)), power_a=0.01)
  # Set disjointness: (|A|, |B|) pairs and examples per pair.
  config.set_disjointness = dict(train=((4, 24), (24, 4), (8, 24), (24, 8)),
                                 train_examples=4000, validation=((8, 24), (24, 8)),
                                 test=((4, 24), (24, 4), (8, 24), (24, 8), (4, 32), (32, 4)),
                                 eval_examples=256)
  # ICLL: DFAs and strings (the paper's are 4–12 states, 10–19 strings of 1–49 letters,
  # 5000/250/250 DFAs); train_examples cycle through the train DFAs.
  config.icll = dict(num_states=(4, 12), num_strings=(10, 19), string_length=(1, 49),
                     num_dfas=(5000, 250, 250), train_examples=20_000)
  config.num_layers = 2
  config.grid = ("attention:64:0",
                 "based:64:4", "based:64:16",
                 "mamba2:64:4", "mamba2:64:32",
                 "gla:64:8", "gla:64:1",
                 "mlstm:64:8", "mlstm:64:1",
                 "qlstm:64:4", "qlstm:64:64",
                 "jrt:64:16")
  config.lrs = (3e-3, 1e-2)
  config.steps = 500
  config.batch_size = 64
  config.eval_every = 100
  config.target_accuracy = 0.99
  config.weight_decay = 0.1
  config.seed = 0
  return config


def get_config(preset: str = "quick"):
  config = _base()
  if preset == "quick":
    return config
  if preset == "quick_sd":   # one label per example: more, cheaper steps
    config.task = "set_disjointness"
    config.grid = tuple(g for g in config.grid if not g.startswith("jrt"))
    config.lrs, config.steps, config.eval_every = (3e-3,), 1500, 250
    return config
  if preset == "quick_icll":
    config.task = "icll"
    config.vocab_size = 20
    config.icll.update(num_strings=(10, 12), string_length=(1, 12), num_dfas=(2000, 64, 64),
                       train_examples=4000)
    config.grid = tuple(g for g in config.grid if not g.startswith("jrt"))
    return config
  if preset == "paper":
    config.vocab_size = 8192
    config.mqar = dict(train=((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000),
                              (256, 32, 20_000), (256, 64, 20_000)),
                       validation=((256, 64, 1000),),
                       test=((64, 4, 1000), (64, 8, 1000), (64, 16, 1000), (128, 32, 1000),
                             (256, 64, 1000), (512, 128, 1000), (1024, 256, 1000)),
                       power_a=0.01)
    config.grid = tuple([f"attention:{d}:0" for d in (48, 64, 128)]
                        + [f"based:{d}:{f}" for d in (48, 64, 128) for f in (8, 16, 24)]
                        + [f"mamba:{d}:{n}" for d in (64, 128, 256) for n in (8, 16, 24)])
    config.lrs = (1e-3, 10 ** -2.5, 10 ** -2, 10 ** -1.5)   # logspace(−3, −1.5, 4)
    config.steps = 20_000
    config.batch_size = 256
    config.eval_every = 500
    return config
  raise ValueError(f"unknown recall preset {preset!r}; expected quick, quick_sd, quick_icll "
                   "or paper")
