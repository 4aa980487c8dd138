"""A trained smoke run shared by the inference tests (the training tests' generated corpus)."""

import pytest

from recurrent_lm import training
from tests.training.conftest import smoke_config, write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """``(corpus_dir, data_dir)``: the generated corpus and a data cache for it."""
  root = tmp_path_factory.mktemp("inference_data")
  return str(write_corpus(root / "corpus")), str(root / "cache")


@pytest.fixture(scope="session")
def trained_run(corpus, tmp_path_factory):
  """The work directory of a 30-step smoke qLSTM on the generated corpus."""
  workdir = tmp_path_factory.mktemp("inference_run") / "run"
  training.train(smoke_config(corpus, steps=30, log_every=10, checkpoint_every=30),
                 str(workdir))
  return workdir
