"""experiments/arch_bench.py at a tiny length: one row per preset with its state size."""

import re
import subprocess
import sys

from recurrent_lm import models
from tests.training.conftest import ENV, REPO


def test_a_tiny_run_prints_a_row_per_preset_with_its_state_bytes():
  result = subprocess.run(
      [sys.executable, "-m", "experiments.arch_bench", "--presets=qlstm,based", "--seq_len=64",
       "--vocab_size=256", "--warmup=0", "--repeats=1"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r"matmul peak [\d.]+ GFLOP/s", result.stdout), result.stdout
  for family in ("qlstm", "based"):
    name = f"{family}_cpu_small"
    row = next(line for line in result.stdout.splitlines() if line.startswith(name))
    state = models.state_bytes(models.presets.get(name, vocab_size=256, max_len=64))
    assert row.split()[-1] == f"{state:,}", row
    assert float(row.split()[3].replace(",", "")) > 0, row
