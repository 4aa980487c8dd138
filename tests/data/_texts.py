"""Small synthetic corpora: pseudo-English documents with the odd tricky character."""

from __future__ import annotations

import json
import pathlib
import random

_SYLLABLES = ("ka", "to", "ri", "men", "sol", "va", "de", "lin", "or", "pu", "sha", "gre",
              "el", "mo", "tan", "que", "bri", "al", "nu", "zor")
_EXTRAS = ("café", "naïve", "日本", "Ωmega", "👍", "1999", "42", "3.14", "a\tb", "“quoted”")


def make_document(rng: random.Random, words: int) -> str:
  """Pseudo-English: words of syllables, sentences, lines, paragraphs, odd spacing."""
  parts = []
  for i in range(words):
    if rng.random() < 0.05:
      word = rng.choice(_EXTRAS)
    else:
      word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.1:
      word = word.capitalize()
    parts.append(word)
    r = rng.random()
    if r < 0.08:
      parts.append(".\n" if rng.random() < 0.7 else ".\n\n")
    elif r < 0.12:
      parts.append(", ")
    elif r < 0.13:
      parts.append("  ")
    elif i < words - 1:
      parts.append(" ")
  return "".join(parts).strip()


def write_corpus(root: pathlib.Path, num_txt: int = 30, num_jsonl_lines: int = 12,
                 seed: int = 0) -> list[str]:
  """``num_txt`` .txt files (some nested) and one .jsonl file; returns the texts written."""
  rng = random.Random(seed)
  texts = []
  for i in range(num_txt):
    text = make_document(rng, rng.randint(40, 400))
    path = root / ("nested/deeper" if i % 3 == 0 else "") / f"doc{i:03d}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    texts.append(text)
  lines = []
  for _ in range(num_jsonl_lines):
    text = make_document(rng, rng.randint(40, 300))
    lines.append(json.dumps({"text": text, "other": 1}))
    texts.append(text)
  (root / "nested" / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
  return texts
