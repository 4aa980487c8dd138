"""The notebooks run, at their small sizes, so they can never rot.

Each is executed top to bottom with nbclient in a kernel of this Python (the
package and ``experiments`` importable), with ``RECURRENT_LM_NOTEBOOK_SMALL=1``
and its own empty working directory; a cell that raises fails the test. The
notebooks assert their own claims (forms agree within the tolerance, text
was generated), and the outputs are checked here too.
"""

import pathlib

import nbclient
import nbformat
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NAMES = ("quickstart", "recurrences", "restore_and_evaluate")


def _text(nb) -> str:
  """Everything the executed cells printed or displayed as text."""
  parts = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      parts.append(output.get("text", ""))
      parts.append(output.get("data", {}).get("text/plain", ""))
  return "".join(parts)


def _images(nb) -> int:
  return sum("image/png" in output.get("data", {}) for cell in nb.cells
             for output in cell.get("outputs", []))


def test_every_notebook_is_stored_clean_and_installs_itself_first():
  assert sorted(p.stem for p in NOTEBOOKS) == sorted(NAMES)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "pip" in code[0].source and 'find_spec("recurrent_lm")' in code[0].source, path.name
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{path.name} is stored with outputs; clear them before committing")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_its_small_size(name, tmp_path, monkeypatch):
  monkeypatch.setenv("RECURRENT_LM_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("RECURRENT_LM_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  text = _text(nb)
  assert _images(nb) >= 1, "no figure was drawn"
  if name == "recurrences":
    assert "all forms agree to" in text and "two pieces vs one pass" in text
  if name == "quickstart":
    assert "->" in text and (tmp_path / "run" / "tokenizer.model").exists()
  if name == "restore_and_evaluate":
    assert "token_perplexity" in text and "keys recalled:" in text
  assert not list(REPO.glob("runs/quickstart")), "a notebook wrote into the repository"
