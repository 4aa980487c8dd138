r"""Compile time of the train step against depth: ``nn.scan`` keeps it flat.

    python -m experiments.compile_bench --preset=gpt_mini --depths=4,24

For each depth, the preset with that many layers: the full train step
(forward, backward, AdamW update) is lowered and compiled from scratch
(``jax.clear_caches()`` between repeats); the median of ``--repeats`` is
printed with its ratio to the shallowest depth.
"""

import statistics
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from recurrent_lm import models
from recurrent_lm.training import step as step_lib

_PRESET = flags.DEFINE_string("preset", "gpt_mini", "Model preset.")
_DEPTHS = flags.DEFINE_list("depths", ["4", "24"], "Numbers of layers.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Batch size.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary size.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Compilations timed per depth.")


def compile_seconds(config: models.ModelConfig, batch_size: int, seq_len: int) -> float:
  """Seconds to lower and compile one train step of ``config`` (nothing cached)."""
  model = models.LanguageModel(config)
  optimizer = optax.adamw(1e-3)
  state = jax.eval_shape(lambda: nn.meta.unbox(
      step_lib.init_state(model, optimizer, (1, 1), seed=0)))
  batch = {name: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
           for name in ("inputs", "targets", "segment_ids")}
  jax.clear_caches()
  start = time.perf_counter()
  jax.jit(step_lib.make_train_step(model, optimizer)).lower(state, batch).compile()
  return time.perf_counter() - start


def main(argv):
  del argv
  base = models.presets.get(_PRESET.value, vocab_size=_VOCAB.value, max_len=_SEQ_LEN.value)
  rows = []
  for depth in map(int, _DEPTHS.value):
    config = models.ModelConfig.from_dict({**base.to_dict(), "num_layers": depth})
    seconds = statistics.median(compile_seconds(config, _BATCH.value, _SEQ_LEN.value)
                                for _ in range(_REPEATS.value))
    rows.append((depth, seconds))
  print(f"{'layers':>6} {'compile s':>10} {'ratio':>6}   ({_PRESET.value}, train step, "
        f"median of {_REPEATS.value})")
  for depth, seconds in rows:
    print(f"{depth:>6} {seconds:>10.2f} {seconds / rows[0][1]:>6.2f}")


if __name__ == "__main__":
  app.run(main)
