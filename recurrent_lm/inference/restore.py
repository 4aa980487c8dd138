"""A trained run, restored for inference from its work directory alone.

    run = inference.load_run("runs/qlstm")      # config, model, params, tokenizer, step
    text = inference.complete(run, ["Once upon a time"], max_new_tokens=64)

``train.py`` leaves everything needed in the work directory: ``config.json``
(the model is rebuilt from it), ``checkpoints/`` (the newest readable one is
restored, resharded onto this machine's devices) and ``tokenizer.model``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
from jax.sharding import Mesh
import ml_collections

from recurrent_lm import data as data_lib
from recurrent_lm import models
from recurrent_lm import training


@dataclasses.dataclass(frozen=True)
class Run:
  """What inference needs of a trained run.

  Attributes:
    workdir: where it was read from.
    config: the run config (``config.json``).
    model: the module rebuilt from ``config.model``.
    params: the parameters of the newest readable checkpoint.
    tokenizer: the run's tokenizer (``tokenizer.model``).
    step: the checkpoint's training step.
  """
  workdir: str
  config: ml_collections.ConfigDict
  model: nn.Module
  params: Any
  tokenizer: data_lib.Tokenizer
  step: int


def load_run(workdir: str, mesh: Mesh | None = None) -> Run:
  """Restores the newest readable checkpoint of ``workdir`` with its config and tokenizer.

  Args:
    workdir: a work directory of ``train.py``.
    mesh: where the parameters go; None: the run's mesh axes if they fit the
      devices here, else all devices on ``data`` (``training.restore_mesh``).

  Raises:
    FileNotFoundError: no ``config.json``, no readable checkpoint or no
      ``tokenizer.model`` (one line naming the file).
    ValueError: a ``config.json`` of another ``config_version`` or with fields
      this release does not know, or a tokenizer that does not match the model.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"workdir {workdir} does not exist; expected a work directory "
                            "of train.py")
  config = training.load_config(workdir)     # checked before anything is read
  training.model_config(config)              # unknown model fields: one line, now
  tokenizer_path = os.path.join(workdir, training.TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(
        f"{tokenizer_path} does not exist; expected the tokenizer train.py saves with the run "
        "(for a run trained before it did: copy <data_dir>/tokenizers/<corpus>-bpe"
        f"{config.data.vocab_size}.model there)")
  tokenizer = data_lib.Tokenizer(tokenizer_path)
  if tokenizer.vocab_size != config.data.vocab_size:
    raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens; expected "
                     f"data.vocab_size={config.data.vocab_size} of the run's config")
  config, state = training.restore_state(workdir, mesh)
  return Run(workdir=workdir, config=config,
             model=models.build(training.model_config(config)), params=state.params,
             tokenizer=tokenizer, step=int(state.step))
