"""One of two JAX processes (CPU, gloo collectives) training the smoke run.

Usage: python -m tests.training._multiprocess_worker PORT PROCESS_ID WORKDIR CORPUS DATA_DIR
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port, process_id, workdir, corpus_dir, data_dir):
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
  from recurrent_lm import training  # pylint: disable=g-import-not-at-top
  from tests.training.conftest import smoke_config  # pylint: disable=g-import-not-at-top
  config = smoke_config((corpus_dir, data_dir), steps=12, log_every=2, checkpoint_every=4)
  summary = training.train(config, workdir)
  print(f"process {process_id} of {jax.process_count()}: steps {summary['steps']} "
        f"final loss {summary['final_loss']!r}")


if __name__ == "__main__":
  main(*sys.argv[1:6])
