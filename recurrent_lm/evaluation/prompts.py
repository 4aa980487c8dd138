"""JRT-Prompt (Arora et al. 2024, "Just read twice") and scoring an answer.

A recurrent model reads its context once, in order, and must decide what to
keep before it knows the question. JRT-Prompt repeats the context, so on the
second read the model knows everything that follows::

    jrt_prompt(context, query)                   = context ‖ context ‖ query
    jrt_prompt(context, query, repeat_query=True) = context ‖ query ‖ context ‖ query

(``‖`` with ``separator`` between the copies). It changes only the prompt,
so it works on any model of this library, at evaluation and in generation;
``repeats=1`` is the plain prompt.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

Prompt = TypeVar("Prompt", str, Sequence[int], np.ndarray)


def jrt_prompt(context: Prompt, query: Prompt, *, repeats: int = 2,
               separator: Prompt | None = None, repeat_query: bool = False):
  """The JRT prompt of ``context`` and ``query`` (module docstring).

  Args:
    context: the document(s) or in-context examples: a string, or token ids.
    query: what is asked of the context, of the same kind.
    repeats: copies of the context (≥ 1).
    separator: put between consecutive copies; nothing if None.
    repeat_query: repeat ``context ‖ query`` instead of the context alone.

  Returns:
    A string for string inputs, else an int32 ``[T]`` array of token ids.
  """
  if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
    raise ValueError(f"repeats={repeats!r}; expected a positive int")
  if isinstance(context, str) != isinstance(query, str) or (
      separator is not None and isinstance(separator, str) != isinstance(context, str)):
    raise TypeError("context, query and separator must all be strings or all token ids; got "
                    f"{type(context).__name__}, {type(query).__name__}, "
                    f"{type(separator).__name__}")
  unit = [context, query] if repeat_query else [context]
  parts = []
  for copy in range(repeats):
    if copy and separator is not None:
      parts.append(separator)
    parts.extend(unit)
  if not repeat_query:
    parts.append(query)
  if isinstance(context, str):
    return "".join(parts)
  return np.concatenate([np.asarray(p, np.int32).reshape(-1) for p in parts])


def answer_log_likelihood(model, params, prompt, answer) -> float:
  """``Σ_i log p(answer_i | prompt, answer_{<i})`` in nats, one forward pass.

  Args:
    model: a ``LanguageModel``.
    params: its parameters (the ``params`` collection).
    prompt: ``[P]`` token ids (plain or from :func:`jrt_prompt`), P ≥ 1.
    answer: ``[A]`` token ids, A ≥ 1.
  """
  prompt = np.asarray(prompt, np.int32).reshape(-1)
  answer = np.asarray(answer, np.int32).reshape(-1)
  if prompt.size < 1 or answer.size < 1:
    raise ValueError(f"prompt has {prompt.size} and answer {answer.size} tokens; "
                     "expected at least 1 each")
  tokens = jnp.asarray(np.concatenate([prompt, answer[:-1]]))[None]
  logits, _ = model.apply({"params": params}, tokens)
  logp = jax.nn.log_softmax(logits[0, prompt.size - 1:])
  return float(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(answer)[:, None], -1)))
