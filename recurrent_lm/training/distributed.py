"""Several hosts: JAX's own multi-controller runtime, started from flags or the environment.

One process per host (per GPU node, per TPU VM) runs the same program;
``jax.distributed.initialize`` connects them through a coordinator (process
0's address), after which ``jax.devices()`` is every device of every process
and the train step's collectives span them. Three ways to start:

* **explicit** — ``coordinator_address``, ``num_processes`` and ``process_id``
  (any cluster; how the tests run two processes on 127.0.0.1);
* **auto** — JAX detects the cluster from its environment: TPU pod slices
  (the TPU metadata), SLURM (``SLURM_*``), Open MPI (``OMPI_*``), and more;
* **none** — a single process (the default).

A process that stops answering is noticed by the coordination service after
``heartbeat_timeout_s``; the other processes then exit with JAX's error
instead of waiting in a collective forever.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               *, auto: bool = False, heartbeat_timeout_s: int = 100,
               initialization_timeout_s: int = 300) -> None:
  """Connects this process to the others (module docstring); a no-op for one process.

  Call it first: before anything touches a JAX device.

  Raises:
    ValueError: an incomplete or inconsistent explicit setting (one line).
  """
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if explicit and auto:
    raise ValueError("distributed: give either --coordinator_address, --num_processes and "
                     "--process_id, or --distributed_auto, not both")
  if explicit:
    if not coordinator_address or num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
          f"distributed: coordinator_address={coordinator_address!r}, num_processes="
          f"{num_processes}, process_id={process_id}; expected an address host:port, a "
          "positive process count and 0 <= process_id < num_processes")
    # CPU devices need a collectives library across processes (accelerators have their own).
    # Set before the backend starts, like initialize itself.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s,
                               initialization_timeout=initialization_timeout_s)
  elif auto:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s,
                               initialization_timeout=initialization_timeout_s)
