"""Fixtures of the data tests: a synthetic corpus written fresh into a temporary directory."""

from __future__ import annotations

import pathlib

import pytest

from tests.data._texts import write_corpus


@pytest.fixture
def text_dir(tmp_path) -> pathlib.Path:
  root = tmp_path / "my texts"
  root.mkdir()
  write_corpus(root)
  return root
