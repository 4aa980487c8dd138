"""Runs restored from their work directories, text in and out, and ``generate.py``."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from recurrent_lm import data as data_lib
from recurrent_lm import inference
from recurrent_lm import training
from tests.training.conftest import ENV, REPO, VOCAB

PROMPT = "The man said that"


def _copy_run(trained_run, tmp_path):
  """A copy of the trained run to damage (the shared one stays whole)."""
  return shutil.copytree(trained_run, tmp_path / "run")


def test_a_run_leaves_its_tokenizer_and_config_version_in_the_workdir(trained_run, corpus):
  stored = json.loads((trained_run / "config.json").read_text())
  assert stored["config_version"] == training.CONFIG_VERSION
  prepared = data_lib.prepare_dataset(corpus[1], corpus[0], VOCAB)
  with open(prepared.tokenizer_path, "rb") as f:
    assert (trained_run / "tokenizer.model").read_bytes() == f.read()


def test_load_run_restores_the_newest_checkpoint_config_and_tokenizer(trained_run):
  run = inference.load_run(str(trained_run))
  config, state = training.restore_state(str(trained_run))
  assert run.step == int(state.step) == 30
  assert run.tokenizer.vocab_size == VOCAB and run.model.config == training.model_config(config)
  for got, want in zip(jax.tree_util.tree_leaves(run.params),
                       jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_text_generation_is_the_token_generation_of_the_prompt_as_a_document(trained_run):
  run = inference.load_run(str(trained_run))
  ids = inference.prompt_ids(run.tokenizer, PROMPT)
  assert ids[0] == run.tokenizer.eod_id and run.tokenizer.decode(ids) == PROMPT
  sampling = inference.Sampling(temperature=1.0, top_k=20)
  tokens = inference.generate(run.model, run.params, [ids], max_new_tokens=40,
                              sampling=sampling, key=jax.random.key(3),
                              stop_tokens=[run.tokenizer.eod_id])[0]
  text = run.tokenizer.decode(tokens)
  assert len(tokens) > 1 and text
  streamed = list(inference.stream_text(run, PROMPT, max_new_tokens=40, sampling=sampling,
                                        key=jax.random.key(3)))
  assert "".join(streamed) == text and len(streamed) > 1
  batch = inference.complete(run, [PROMPT, "It was"], max_new_tokens=40, sampling=sampling,
                             key=jax.random.key(3))
  assert batch[0] == text   # the row's draws do not depend on its neighbours


@pytest.mark.parametrize("text", ["naïve café, 東京 🙂 and ∑ x²", "plain words only"])
def test_the_detokenizer_streams_pieces_that_join_to_the_decoded_text(trained_run, text):
  tokenizer = data_lib.Tokenizer(str(trained_run / "tokenizer.model"))
  ids = tokenizer.encode(text)
  detokenizer = inference.Detokenizer(tokenizer)
  pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
  assert "".join(pieces) == text
  assert not any("\ufffd" in p for p in pieces)      # never half a character
  if any(ord(c) > 127 for c in text):
    assert "" in pieces[:-1]   # a multi-byte character was held back at least once


def test_load_run_refuses_a_missing_tokenizer_another_version_and_unknown_fields(
    trained_run, tmp_path):
  workdir = _copy_run(trained_run, tmp_path)
  (workdir / "tokenizer.model").unlink()
  with pytest.raises(FileNotFoundError, match=r"tokenizer.model does not exist; expected the "
                     "tokenizer train.py saves"):
    inference.load_run(str(workdir))
  shutil.copy(trained_run / "tokenizer.model", workdir / "tokenizer.model")
  stored = json.loads((workdir / "config.json").read_text())
  (workdir / "config.json").write_text(json.dumps({**stored, "config_version": 2}))
  with pytest.raises(ValueError, match=r"has config_version=2; this recurrent_lm .* reads "
                     r"config_version=1"):
    inference.load_run(str(workdir))
  stored["model"]["rotary_fraction"] = 0.5
  (workdir / "config.json").write_text(json.dumps(stored))
  with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['rotary_fraction'\]"):
    inference.load_run(str(workdir))
  with pytest.raises(FileNotFoundError, match="does not exist; expected a work directory"):
    inference.load_run(str(tmp_path / "nowhere"))


def test_an_empty_prompt_is_refused(trained_run):
  run = inference.load_run(str(trained_run))
  with pytest.raises(ValueError, match="prompt '' is empty; expected some text"):
    list(inference.stream_text(run, "", max_new_tokens=4))


def _generate(*flags):
  return subprocess.run([sys.executable, "-m", "experiments.generate", *flags], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=300)


def test_generate_script_streams_the_continuation(trained_run, tmp_path):
  prompt_file = tmp_path / "prompt.txt"
  prompt_file.write_text(PROMPT)
  result = _generate(f"--workdir={trained_run}", f"--prompt_file={prompt_file}",
                     "--max_new_tokens=24", "--temperature=0.8", "--top_p=0.9", "--seed=1")
  assert result.returncode == 0, result.stderr[-2000:]
  run = inference.load_run(str(trained_run))
  want = "".join(inference.stream_text(
      run, PROMPT, max_new_tokens=24, sampling=inference.Sampling(0.8, 0, 0.9),
      key=jax.random.key(1)))
  assert result.stdout == PROMPT + want + "\n"
  assert f"{trained_run}: step 30" in result.stderr


def test_generate_script_errors_are_one_line(trained_run, tmp_path):
  workdir = _copy_run(trained_run, tmp_path)
  (workdir / "tokenizer.model").unlink()
  newer = shutil.copytree(trained_run, tmp_path / "newer")
  stored = json.loads((newer / "config.json").read_text())
  (newer / "config.json").write_text(json.dumps({**stored, "config_version": 7}))
  cases = [
      ((f"--workdir={workdir}", "--prompt=Hello"), "tokenizer.model does not exist"),
      ((f"--workdir={newer}", "--prompt=Hello"), "has config_version=7; this recurrent_lm"),
      ((f"--workdir={trained_run}", "--prompt="), "the prompt is empty"),
      ((f"--workdir={trained_run}",), "give exactly one of --prompt and --prompt_file"),
      ((f"--workdir={trained_run}", f"--prompt_file={tmp_path}/none.txt"),
       "none.txt cannot be read"),
      ((f"--workdir={trained_run}", "--prompt=Hi", "--top_p=0"), "top_p=0.0; expected"),
  ]
  for flags, message in cases:
    result = _generate(*flags)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (flags, result.stderr[-2000:])
    assert lines[0].startswith("generate.py: error: ") and message in lines[0], lines
