"""``make demo``: a small qLSTM or GPT on the default corpus within a wall-clock budget.

    --config=experiments/configs/demo.py:qlstm    (or :gpt)

Both are the ``cpu_small`` preset (4 layers, width 128, 4 heads) with a 4,096
token vocabulary, 256-token rows and 16 rows a step. The step count comes from
``train.time_budget_s`` (the step is timed first, Languini-style), so both
models get the same compute time. At this size a higher peak learning rate
than Languini's 6e-4 (tuned for 4+ layers of width 512+) trains faster.
"""

from experiments.configs import common


def get_config(family: str = "qlstm"):
  config = common.run_config(f"{family}_cpu_small", vocab_size=4096, seq_len=256,
                             batch_size=16)
  config.train.update(steps=0, time_budget_s=180.0, log_every=10, checkpoint_every=100)
  config.optimizer.update(peak_lr=3e-3, end_lr=3e-5, warmup_steps=50)
  config.eval.update(batch_size=16)
  return config
