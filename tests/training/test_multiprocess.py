"""Two real JAX processes on 127.0.0.1 (CPU, gloo) train one run together.

Each process reads its own share of the documents (grain shards by process)
and contributes half of every global batch; process 0 writes the run's files;
orbax writes one checkpoint holding both processes' iterator positions.
"""

import json
import socket
import subprocess
import sys
import time

import pytest

from tests.training.conftest import ENV, REPO, smoke_flags


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_on_two_processes(corpus, workdir):
  port = _free_port()
  workers = [subprocess.Popen(
      [sys.executable, "-m", "tests.training._multiprocess_worker", str(port), str(i),
       str(workdir), *corpus], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=600) for w in workers]
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


def test_two_processes_train_one_run_and_resume_it(corpus, tmp_path):
  workdir = tmp_path / "run"
  outputs = _train_on_two_processes(corpus, workdir)
  finals = [out.strip().splitlines()[-1] for out in outputs]
  assert finals[0].startswith("process 0 of 2: steps 12")
  assert finals[0].split("final loss")[1] == finals[1].split("final loss")[1]   # one run
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4, 6, 8, 10, 12]       # written once, by process 0
  assert lines[-1]["loss"] < lines[0]["loss"]
  data = workdir / "checkpoints" / "12" / "data"
  assert (data / "process_0-of-2.json").exists() and (data / "process_1-of-2.json").exists()
  # The same command again: both processes restore step 12 and have nothing left to do.
  again = _train_on_two_processes(corpus, workdir)
  assert all("resuming from the checkpoint at step 12" in out for out in again)
  assert (workdir / "metrics.jsonl").read_text().count("\n") == 6


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
