"""A small text corpus and its prepared data, shared by the training tests.

The corpus is generated (60 documents of sentences drawn from 200 common
English words, ~100 KB), so these tests need no network; the default corpus
is exercised by ``tests/data`` and ``make demo``.
"""

import os
import pathlib

import numpy as np
import pytest

from experiments.configs import smoke

_WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his "
    "from at which but have an they you were her she there one all we their been has "
    "when who will more no if out so said what up its about into than them can only "
    "other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years "
    "where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between "
    "both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three").split()

VOCAB = 512


def write_corpus(directory: pathlib.Path, num_docs: int = 60, seed: int = 0) -> pathlib.Path:
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  for d in range(num_docs):
    sentences = [" ".join(rng.choice(_WORDS, rng.integers(4, 14))).capitalize() + "."
                 for _ in range(rng.integers(20, 60))]
    paragraphs = [" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)]
    (directory / f"doc{d:03d}.txt").write_text("\n\n".join(paragraphs) + "\n")
  return directory


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """``(corpus_dir, data_dir)``: the generated corpus and a data cache for it."""
  root = tmp_path_factory.mktemp("training_data")
  return str(write_corpus(root / "corpus")), str(root / "cache")


def smoke_config(corpus, **train):
  """The smoke config on the test corpus; ``train`` overrides ``config.train``."""
  corpus_dir, data_dir = corpus
  config = smoke.get_config()
  config.data.update(corpus=corpus_dir, data_dir=data_dir, vocab_size=VOCAB)
  config.train.update(train)
  return config


def smoke_flags(corpus, workdir, **overrides) -> list[str]:
  """Command-line flags of ``experiments.train`` for the same run."""
  corpus_dir, data_dir = corpus
  flags = [f"--workdir={workdir}", "--config=experiments/configs/smoke.py",
           f"--config.data.corpus={corpus_dir}", f"--config.data.data_dir={data_dir}",
           f"--config.data.vocab_size={VOCAB}"]
  return flags + [f"--config.{name}={value}" for name, value in overrides.items()]


REPO = str(pathlib.Path(__file__).resolve().parents[2])
ENV = {**os.environ, "PYTHONPATH": REPO}
