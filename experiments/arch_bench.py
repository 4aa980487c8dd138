r"""Training throughput and state size of every architecture at one length.

    python -m experiments.arch_bench --seq_len=2048 --presets=gpt,qlstm,based,jrt

For each ``<family>_cpu_small`` preset: the full train step (forward,
backward, AdamW update) on ``batch_size × seq_len`` random tokens, timed
after ``--warmup`` steps as the median of ``--repeats``; printed as tokens/s
with the model FLOPs utilisation against this machine's measured matmul
throughput, beside the parameter count and the bytes of recurrent state per
sequence (``models.state_bytes``; KV caches at their capacity). The step is
``experiments/throughput.py``'s train mode (``throughput_lib.train_cell``) at
one length; that script sweeps the length.
"""

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import _cli
from experiments import throughput_lib
from recurrent_lm import models
from recurrent_lm.training import throughput

_PRESETS = flags.DEFINE_list(
    "presets", ["gpt", "qlstm", "based", "jrt", "liger", "h3", "mamba", "mamba2", "xlstm"],
    "Families of <family>_cpu_small presets.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows per step.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps; the median is printed.")


def step_seconds(config: models.ModelConfig, batch_size: int, seq_len: int, warmup: int,
                 repeats: int) -> tuple[float, float, int]:
  """``(median seconds per train step, FLOPs per token, parameter count)``."""
  model = models.build(config)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, config.vocab_size, (batch_size, seq_len + 1), np.int32)
  settings = throughput_lib.Settings(batch_size=batch_size, vocab_size=config.vocab_size,
                                     warmup=warmup, repeats=repeats,
                                     memory_limit_gib=float("inf"))
  seconds = throughput_lib.train_cell(model, tokens, settings)["seconds"]
  count, flops = throughput.model_cost(config, seq_len)
  return seconds, flops, count


def main(argv):
  del argv
  _cli.quiet_logs()
  peak = throughput.matmul_peak_flops()
  tokens = _BATCH.value * _SEQ_LEN.value
  print(f"train step on {_BATCH.value} x {_SEQ_LEN.value} tokens, median of {_REPEATS.value} "
        f"after {_WARMUP.value} warm-up; matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"({jax.devices()[0].device_kind})")
  print(f"{'preset':<18} {'params':>10} {'s/step':>7} {'tokens/s':>9} {'MFU':>6} "
        f"{'state bytes':>12}")
  for family in _PRESETS.value:
    name = f"{family}_cpu_small"
    config = models.presets.get(name, vocab_size=_VOCAB.value, max_len=_SEQ_LEN.value)
    seconds, flops, params = step_seconds(config, _BATCH.value, _SEQ_LEN.value,
                                          _WARMUP.value, _REPEATS.value)
    print(f"{name:<18} {params:>10,} {seconds:>7.2f} {tokens / seconds:>9,.0f} "
          f"{100 * flops * tokens / seconds / peak:>5.1f}% "
          f"{models.state_bytes(config):>12,}", flush=True)


if __name__ == "__main__":
  app.run(main)
