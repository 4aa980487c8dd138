"""Two real JAX processes on 127.0.0.1 (CPU, gloo) train one run together.

Each process has 4 simulated CPU devices; together they form the 8-device mesh
of a single process with 8 devices. A process reads the rows of the global
batch its devices hold (each row of the batch is its own packed stream, so the
global batch does not depend on the process count), process 0 writes the run's
files, and orbax writes one checkpoint holding both processes' iterator rows.
"""

import json
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.training.conftest import ENV, REPO, smoke_flags

# 20 steps, a checkpoint at 10 and 20; both kept.
_RUN = {"train.steps": 20, "train.log_every": 1, "train.checkpoint_every": 10,
        "train.keep_checkpoints": 3}
# Another reduction order (gloo across processes vs within one) changes the
# last bits, which 20 Adam steps may amplify; measured worst 1.7e-7.
_RTOL = 1e-5


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(corpus, workdir, *, processes: int, devices: int, **overrides):
  """``experiments.train`` on ``processes`` processes of ``devices`` CPU devices each."""
  env = {**ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  flags = smoke_flags(corpus, workdir, **{**_RUN, **overrides})
  port = _free_port()
  distributed = (lambda i: [f"--coordinator_address=127.0.0.1:{port}",
                            f"--num_processes={processes}", f"--process_id={i}"]
                 if processes > 1 else [])
  workers = [subprocess.Popen([sys.executable, "-m", "experiments.train", *flags,
                               *distributed(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(processes)]
  outputs = [w.communicate(timeout=600) for w in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


def _losses(workdir) -> dict[int, float]:
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [l["step"] for l in lines]
  assert steps == sorted(set(steps)), steps          # written once, by process 0
  return {l["step"]: l["loss"] for l in lines}


def _from_step_10(workdir, copy):
  """A copy of the run with its newest checkpoint removed: resuming it redoes steps 11-20."""
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "checkpoints" / "20")
  return copy


def _assert_same_losses(got: dict[int, float], expected: dict[int, float], steps):
  got_, expected_ = np.array([got[s] for s in steps]), np.array([expected[s] for s in steps])
  np.testing.assert_allclose(got_, expected_, rtol=_RTOL)
  return float(np.max(np.abs(got_ / expected_ - 1)))


def test_two_processes_of_four_devices_train_as_one_of_eight_and_restore_across(corpus,
                                                                                 tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  _train(corpus, one, processes=1, devices=8)
  outputs = _train(corpus, two, processes=2, devices=4)
  single, double = _losses(one), _losses(two)
  assert sorted(single) == sorted(double) == list(range(1, 21))
  worst = _assert_same_losses(double, single, range(1, 21))
  assert single[20] < single[1]
  assert all("steps" in out for out in outputs)
  data = two / "checkpoints" / "20" / "data"
  assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]

  # Written by two processes, resumed by one (and the other way round): the
  # data position and the arrays carry over, so steps 11-20 are the same again.
  resumed_one = _from_step_10(two, tmp_path / "two_then_one")
  out, = _train(corpus, resumed_one, processes=1, devices=8)
  assert "resuming from the checkpoint at step 10" in out
  worst = max(worst, _assert_same_losses(_losses(resumed_one), single, range(11, 21)))
  resumed_two = _from_step_10(one, tmp_path / "one_then_two")
  outs = _train(corpus, resumed_two, processes=2, devices=4)
  assert all("resuming from the checkpoint at step 10" in o for o in outs)
  worst = max(worst, _assert_same_losses(_losses(resumed_two), single, range(11, 21)))
  print(f"worst relative loss difference over the runs: {worst:.2e} (tolerance {_RTOL})")


def _start(corpus, workdir, port, process_id):
  flags = smoke_flags(corpus, workdir, **{"train.steps": 60, "train.checkpoint_every": 10,
                                          "train.log_every": 10})
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *flags, f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={process_id}", "--heartbeat_timeout_s=10"],
      cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_killed_process_ends_the_other_at_once_and_both_resume(corpus, tmp_path):
  """SIGKILL one of two processes after the first checkpoint: the other exits
  within 30 s with one line and status 4 (no hang in the collective); the same
  two commands again resume from the newest checkpoint and finish."""
  workdir = tmp_path / "run"
  port = _free_port()
  workers = [_start(corpus, workdir, port, i) for i in range(2)]
  deadline = time.monotonic() + 300
  while not (workdir / "checkpoints" / "10").exists():
    assert time.monotonic() < deadline and workers[0].poll() is None, "no checkpoint came"
    time.sleep(0.2)
  workers[1].kill()
  killed_at = time.monotonic()
  _, err = workers[0].communicate(timeout=120)
  waited = time.monotonic() - killed_at
  if workers[0].returncode == 0:
    pytest.skip("process 0 finished before the kill took effect")
  lines = [l for l in err.splitlines() if l.startswith("train.py: error:")]
  assert workers[0].returncode == 4 and waited < 30, (workers[0].returncode, waited, err[-2000:])
  assert len(lines) == 1 and "another process has most likely died" in lines[0], err[-2000:]
  workers[1].communicate()
  saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  port = _free_port()
  again = [_start(corpus, workdir, port, i) for i in range(2)]
  outputs = [w.communicate(timeout=600) for w in again]
  for worker, (out, err) in zip(again, outputs):
    assert worker.returncode == 0, err[-3000:]
    assert f"resuming from the checkpoint at step {saved}" in out
  assert json.loads(outputs[0][0][outputs[0][0].index("{"):])["steps"] == 60


def test_incomplete_distributed_settings_are_one_line():
  from recurrent_lm.training import distributed
  with pytest.raises(ValueError, match=r"num_processes=2, process_id=2; expected an address "
                     r"host:port, a positive process count and 0 <= process_id < num_processes"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  with pytest.raises(ValueError, match="coordinator_address=''"):
    distributed.initialize("", 2, 0)
  with pytest.raises(ValueError, match="not both"):
    distributed.initialize("127.0.0.1:1234", 2, 0, auto=True)
  distributed.initialize()     # one process: nothing to do


def test_the_sequence_split_over_two_processes_trains_as_one_process(corpus, tmp_path):
  """mesh sequence=8 over 2 processes: each reads every row and keeps its half
  of the columns; the recurrences combine their states across the processes."""
  mesh = {"mesh.data": 1, "mesh.sequence": 8, "train.checkpoint_every": 20}
  _train(corpus, tmp_path / "one", processes=1, devices=8, **mesh)
  _train(corpus, tmp_path / "two", processes=2, devices=4, **mesh)
  worst = _assert_same_losses(_losses(tmp_path / "two"), _losses(tmp_path / "one"), range(1, 21))
  print(f"worst relative loss difference: {worst:.2e} (tolerance {_RTOL})")
