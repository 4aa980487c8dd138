"""A tiny qLSTM (or GPT) on the default corpus in seconds: tests and quick checks.

    python -m experiments.train --config=experiments/configs/smoke.py --workdir=/tmp/smoke
    --config=experiments/configs/smoke.py:gpt       the cpu_tiny GPT instead
"""

from experiments.configs import common


def get_config(family: str = "qlstm"):
  config = common.run_config(f"{family}_cpu_tiny", vocab_size=1024, seq_len=64, batch_size=8)
  config.train.update(steps=40, log_every=5, checkpoint_every=20)
  config.optimizer.update(peak_lr=3e-3, warmup_steps=10)
  config.eval.update(max_tokens=20_000, batch_size=4, stride=32)
  return config
