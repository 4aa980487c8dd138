"""Checkpoints: an orbax ``CheckpointManager`` of the train state and the data iterator.

Each checkpoint ``<workdir>/checkpoints/<step>/`` holds two items, saved
asynchronously; the newest ``keep`` are kept:

- ``state``: the ``TrainState`` (params, optimizer state, step, RNG). The
  arrays reshard onto any mesh: orbax reads each device's slice.
- ``data``: the grain iterator's position, one ``process_<i>-of-<n>.json`` per
  process holding that process's rows of the global batch. Restoring merges
  the rows of all ``n`` files (``data.merge_data_states``), so a checkpoint
  written by ``n`` processes resumes on any other number.

Restoring takes the newest checkpoint that reads back; a
damaged one (truncated, corrupted) is reported, moved aside to
``<workdir>/checkpoints_damaged/`` — never deleted — and the one before it is
tried, so a crash during a save can never make a run crash-loop.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time
from typing import Any

import grain
import orbax.checkpoint as ocp

from recurrent_lm import data as data_lib

_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class Checkpointer:
  """Saves and restores ``(TrainState, data iterator)`` under ``directory``.

  Args:
    directory: where the step folders live.
    keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str, *, keep: int):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"keep={keep!r}; expected a positive int")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, state, data_iterator) -> None:
    """Starts saving; returns while the write finishes in the background.

    The previous save is finished first: orbax skips a save requested while
    another is in flight, and a skipped save must never pass silently.
    """
    self._manager.wait_until_finished()
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
    if not saved:
      raise RuntimeError(f"orbax did not save the checkpoint of step {step} in {self.directory}")

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state, data_iterator=None) -> Any | None:
    """The newest readable state, or None when there is none.

    Args:
      abstract_state: the ``TrainState`` as ``jax.ShapeDtypeStruct`` leaves
        with shardings, which the restored arrays take.
      data_iterator: a grain iterator whose position is restored too (in
        place); None restores the state alone. Only a resuming run (with an
        iterator) moves damaged checkpoints aside; evaluation just skips them.
    """
    for step in reversed(self.steps()):
      try:
        data_state = None if data_iterator is None else self._data_state(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except data_lib.DataStateError:
        raise   # readable, but of another layout: never set aside
      except Exception as error:   # orbax raises many kinds on a damaged file
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        where = self._set_aside(step) if data_iterator is not None else None
        print(f"checkpoint at step {step} is unreadable ({reason})"
              + (f"; moved it to {where}" if where else "")
              + "; trying the one before", flush=True)
        continue
      if data_state is not None:
        data_iterator.set_state(data_state)
      return restored.state
    return None

  def _data_state(self, step: int) -> dict:
    """The data position of ``step``: every process's rows, merged."""
    folder = os.path.join(self.directory, str(step), "data")
    files = {}
    for path in glob.glob(os.path.join(folder, "process_*-of-*.json")):
      match = _DATA_FILE.fullmatch(os.path.basename(path))
      if match:
        files[int(match[1])] = (int(match[2]), path)
    counts = {count for count, _ in files.values()}
    if len(counts) != 1 or sorted(files) != list(range(counts.pop())):
      raise FileNotFoundError(f"{folder} holds data files {sorted(files)}; expected "
                              "process_<i>-of-<n>.json for every i < n")
    states = []
    for _, path in files.values():
      with open(path) as f:
        states.append(json.load(f))
    return data_lib.merge_data_states(states)

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step folder out of the manager's sight; returns where."""
    damaged = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged")
    os.makedirs(damaged, exist_ok=True)
    target = os.path.join(damaged, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
