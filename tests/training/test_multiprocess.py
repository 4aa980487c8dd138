"""Two real JAX processes on 127.0.0.1 (CPU, gloo) train one run together.

Each process reads its own share of the documents (grain shards by process)
and contributes half of every global batch; process 0 writes the run's files;
orbax writes one checkpoint holding both processes' iterator positions.
"""

import json
import socket
import subprocess
import sys

from tests.training.conftest import ENV, REPO


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
