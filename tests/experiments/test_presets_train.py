"""Every CPU preset trains on the default books corpus with a decreasing loss.

Slow (minutes: the default corpus and one short run per architecture); run
with ``make test-slow``.
"""

import json
import subprocess
import sys

import pytest

from tests.training.conftest import ENV, REPO

FAMILIES = ["qlstm", "gpt", "based", "jrt", "mamba", "xlstm", "liger", "mamba2", "gla", "mlstm", "h3",
            "titans_mal", "titans_mag", "titans_mac", "moneta", "yaad", "memora", "moe", "rmoe", "ngram",
            "hmt"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_preset_trains_with_a_decreasing_loss(family, tmp_path):
  workdir = tmp_path / family
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config=experiments/configs/demo.py:{family}",
       f"--workdir={workdir}", "--config.train.steps=40", "--config.train.log_every=10",
       "--config.optimizer.warmup_steps=10"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  losses = [json.loads(line)["loss"]
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
