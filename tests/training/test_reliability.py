"""Reliability of ``experiments.train``: kill and resume, damaged checkpoints,
non-finite losses, signals. Each test runs the real script in a subprocess.

"Identical" is bitwise: the resumed run's ``metrics.jsonl`` (loss, grad norm
at every step) equals the uninterrupted run's line for line. A skipped or
repeated batch would change every loss after it.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.training.conftest import ENV, REPO, smoke_flags

STEPS = 24
EVERY = dict(**{"train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 4})


def _command(corpus, workdir, **overrides):
  return [sys.executable, "-m", "experiments.train",
          *smoke_flags(corpus, workdir, **{**EVERY, **overrides})]


def _run(corpus, workdir, **overrides):
  return subprocess.run(_command(corpus, workdir, **overrides), cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=600)


def _trajectory(workdir):
  """``{step: (loss, grad_norm)}`` of a run's metrics.jsonl."""
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def _start_and_stop_at(corpus, workdir, step, how):
  """Starts a run; sends it ``how`` once ``step`` steps are logged and a checkpoint is on disk."""
  process = subprocess.Popen(_command(corpus, workdir), cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = pathlib.Path(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    committed = list(pathlib.Path(workdir, "checkpoints").glob("*/commit_success.txt"))
    if committed and metrics.exists() and len(metrics.read_text().splitlines()) >= step:
      process.send_signal(how)
      break
    time.sleep(0.02)
  out, err = process.communicate(timeout=300)
  return process.returncode, out, err


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """The uninterrupted run."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = _run(corpus, workdir)
  assert result.returncode == 0, result.stderr
  trajectory = _trajectory(workdir)
  assert sorted(trajectory) == list(range(1, STEPS + 1))
  return trajectory


def test_sigkill_at_a_random_step_then_resume_is_identical(corpus, reference, tmp_path):
  workdir = tmp_path / "run"
  kill_at = int(np.random.default_rng().integers(5, STEPS - 2))
  returncode, _, _ = _start_and_stop_at(corpus, workdir, kill_at, signal.SIGKILL)
  assert returncode == -signal.SIGKILL, f"the run ended before the kill (status {returncode})"
  result = _run(corpus, workdir)
  assert result.returncode == 0, result.stderr
  assert "resuming from the checkpoint at step" in result.stdout, (kill_at, result.stdout)
  assert _trajectory(workdir) == reference, f"killed at step {kill_at}"


def test_sigterm_saves_a_checkpoint_then_resume_is_identical(corpus, reference, tmp_path):
  workdir = tmp_path / "run"
  returncode, out, _ = _start_and_stop_at(corpus, workdir, 9, signal.SIGTERM)
  assert returncode == 128 + signal.SIGTERM
  stopped_at = int(out.split("after step ")[1].split(";")[0])
  assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
  result = _run(corpus, workdir)
  assert result.returncode == 0, result.stderr
  assert f"resuming from the checkpoint at step {stopped_at}" in result.stdout
  assert _trajectory(workdir) == reference


def test_damaged_newest_checkpoint_falls_back_to_the_previous(corpus, tmp_path):
  workdir = tmp_path / "run"
  assert _run(corpus, workdir, **{"train.steps": 12}).returncode == 0
  finished = _trajectory(workdir)
  newest = workdir / "checkpoints" / "12"
  for path in newest.rglob("*"):
    if path.is_file():
      os.truncate(path, path.stat().st_size // 2)
  result = _run(corpus, workdir, **{"train.steps": 12})
  assert result.returncode == 0, result.stderr
  assert "checkpoint at step 12 is unreadable" in result.stdout
  assert "resuming from the checkpoint at step 8" in result.stdout
  assert len(list((workdir / "checkpoints_damaged").iterdir())) == 1   # kept, not deleted
  assert (workdir / "checkpoints" / "12").is_dir()
  # A third start finds a good newest checkpoint: no crash loop, nothing to redo.
  again = _run(corpus, workdir, **{"train.steps": 12})
  assert again.returncode == 0 and "unreadable" not in again.stdout
  assert _trajectory(workdir) == finished


def test_a_data_position_of_another_layout_is_refused_in_one_line_and_kept(corpus, tmp_path):
  """A checkpoint whose data position an earlier release wrote (documents dealt
  to processes: no ``format``) is readable but cannot be continued: one line,
  and the checkpoint stays where it is (it is not damaged)."""
  workdir = tmp_path / "run"
  assert _run(corpus, workdir, **{"train.steps": 4}).returncode == 0
  position = workdir / "checkpoints" / "4" / "data" / "process_0-of-1.json"
  position.write_text(json.dumps({"next_index": 17, "parent": {}}))
  result = _run(corpus, workdir, **{"train.steps": 4})
  lines = [l for l in result.stderr.splitlines() if l.startswith("train.py: error:")]
  assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
  assert "format=None" in lines[0] and "expected format=2" in lines[0]
  assert position.exists() and not (workdir / "checkpoints_damaged").exists()


def test_non_finite_loss_stops_with_the_step_and_keeps_good_checkpoints(corpus, tmp_path):
  workdir = tmp_path / "run"
  result = _run(corpus, workdir, **{"optimizer.peak_lr": 1e30, "optimizer.warmup_steps": 0,
                                    "train.checkpoint_every": 1})
  assert result.returncode == 3
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("train.py: error: loss is nan at step "), line
  bad_step = int(line.split("at step ")[1].split(";")[0])
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert all(step < bad_step for step in saved), (saved, bad_step)
