"""A Languini-size run: ``--config=experiments/configs/languini.py:gpt_small``.

The argument is a preset of ``recurrent_lm.models.presets`` (``gpt_mini`` …
``qlstm_medium``, and the ``*_cpu_*`` sizes). Languini's setting: vocabulary
16,384, sequence length 512, batch 128 (here 16 by default; set
``--config.data.batch_size``), steps from the compute class
(``--config.train.steps`` or ``--config.train.time_budget_s``).
"""

from experiments.configs import common


def get_config(preset: str = "qlstm_mini"):
  config = common.run_config(preset)
  config.train.steps = 10_000
  return config
