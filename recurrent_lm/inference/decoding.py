"""Generation: prefill a batch of prompts, then decode one token at a time
carrying every layer's state.

Prompts of different lengths are left-padded into one ``[B, L]`` batch. The
padding is a document of its own (segment 0) and the prompt another
(segment 1), so every mixer starts the prompt from a fresh state, attention
never reads the padding and learned positions restart at 0 with the prompt:
the packing invariant, which every mixer is tested for, makes a padded row
equal its prompt alone. Decoding continues segment 1.

    prefill:  logits, state = model(prompts [B, L], segment_ids)    (chunked forms)
              token_1 ~ sample(logits[:, -1])
    decode:   logits, state = model(token_t [B, 1], state);  token_{t+1} ~ sample(logits)

A recurrent layer's state has a fixed size, so a decoded token costs the
same at any context; an attention layer's KV cache has the capacity
``max_len`` of its config, and models bounded by it (full attention,
learned positions) refuse a ``L + max_new_tokens`` beyond it.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_lm.evaluation import prompts as prompts_lib
from recurrent_lm.inference.sampling import GREEDY, Sampling, sample

PAD_SEGMENT, PROMPT_SEGMENT = 0, 1


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray,
                                                                           np.ndarray]:
  """``(tokens, segment_ids)``, both ``[B, L]`` int32: the prompts left-padded
  with ``pad_id`` to the longest (``L``), padding in segment 0, prompts in 1."""
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts:
    raise ValueError("no prompts; expected a batch of at least one")
  empty = [i for i, p in enumerate(prompts) if p.size == 0]
  if empty:
    raise ValueError(f"prompt {empty[0]} is empty; expected at least one token per prompt")
  length = max(p.size for p in prompts)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segment_ids = np.full((len(prompts), length), PAD_SEGMENT, np.int32)
  for row, p in enumerate(prompts):
    tokens[row, length - p.size:] = p
    segment_ids[row, length - p.size:] = PROMPT_SEGMENT
  return tokens, segment_ids


def max_context(config) -> int | None:
  """Tokens a sequence may hold in all (prompt and generated): ``max_len`` when
  a full-attention cache or a learned position table bounds it, else None."""
  layout = getattr(config, "layout", ())
  if getattr(config, "positions", None) == "learned" or any(
      spec.name == "attention" for spec in layout):
    return config.max_len
  return None


@functools.partial(jax.jit, static_argnums=(0, 5))
def prefill(model, params, tokens, segment_ids, key, sampling=GREEDY):
  """Reads the padded prompts ``tokens`` ``[B, L]`` (:func:`pad_prompts`) with the
  chunked forms; ``([B] first generated tokens, state)``. Jitted; ``model`` and
  ``sampling`` are static."""
  logits, state = model.apply({"params": params}, tokens, segment_ids=segment_ids)
  return sample(logits[:, -1], key, sampling), state


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=2)
def decode_step(model, params, state, tokens, key, sampling=GREEDY):
  """Reads ``tokens`` ``[B]`` after ``state`` and samples the next: ``([B] tokens,
  state)``. Jitted; ``state`` is donated (its buffers are reused in place)."""
  segment_ids = jnp.full((tokens.shape[0], 1), PROMPT_SEGMENT, jnp.int32)
  logits, state = model.apply({"params": params}, tokens[:, None], state,
                              segment_ids=segment_ids)
  return sample(logits[:, -1], key, sampling), state


def stream(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           sampling: Sampling = GREEDY, key: jax.Array | None = None,
           stop_tokens: Sequence[int] = (), jrt_repeats: int = 1,
           pad_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``(tokens [B], active [B] bool)`` once per decoded position.

  ``tokens[i]`` is row i's next token where ``active[i]``; a row stops being
  active after it emitted one of ``stop_tokens`` (that token is yielded, as
  the last active one). Stops when every row has stopped or after
  ``max_new_tokens`` positions.

  Args:
    model: a ``LanguageModel`` (any layout); ``params`` its parameters.
    prompts: B token-id sequences of any lengths ≥ 1.
    max_new_tokens: positions to decode at most (≥ 1).
    sampling: how tokens are drawn (:class:`Sampling`; greedy by default).
    key: the RNG key of the draws; required unless greedy.
    stop_tokens: ids that end a row (e.g. the end-of-document id).
    jrt_repeats: JRT-Prompt: each prompt read this many times (1: as given).
    pad_id: the id that fills the left padding (never attended to).
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}; expected a positive int")
  if sampling.temperature > 0 and key is None:
    raise ValueError(f"sampling at temperature {sampling.temperature} needs a key; "
                     "pass key=jax.random.key(seed)")
  if jrt_repeats != 1:     # p ‖ p ‖ …: the whole prompt is the context read again
    prompts = [prompts_lib.jrt_prompt(p, np.asarray(p, np.int32)[:0], repeats=jrt_repeats)
               for p in prompts]
  tokens, segment_ids = pad_prompts(prompts, pad_id)
  vocab = model.config.vocab_size
  if tokens.min() < 0 or tokens.max() >= vocab:
    bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
    raise ValueError(f"prompt token id {bad} is outside [0, {vocab}); the prompts do not "
                     "match the model's vocabulary")
  limit = max_context(model.config)
  if limit is not None and tokens.shape[1] + max_new_tokens > limit:
    raise ValueError(f"prompt of {tokens.shape[1]} tokens + max_new_tokens={max_new_tokens} "
                     f"exceeds the model's max_len={limit} (its attention cache or position "
                     "table); expected at most that many in all")
  key = jax.random.key(0) if key is None else key    # greedy: never used
  stops = np.asarray(list(stop_tokens), np.int32)
  key, draw = jax.random.split(key)
  new, state = prefill(model, params, jnp.asarray(tokens), jnp.asarray(segment_ids), draw,
                        sampling)
  active = np.ones(tokens.shape[0], bool)
  for position in range(max_new_tokens):
    new_host = np.asarray(new)
    yield new_host, active.copy()
    active &= ~np.isin(new_host, stops)
    if not active.any() or position + 1 == max_new_tokens:
      return
    key, draw = jax.random.split(key)
    new, state = decode_step(model, params, state, new, draw, sampling)


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = GREEDY, key: jax.Array | None = None,
             stop_tokens: Sequence[int] = (), jrt_repeats: int = 1,
             pad_id: int = 0) -> list[list[int]]:
  """The generated tokens of every prompt (stop token included when one came);
  arguments as :func:`stream`."""
  out: list[list[int]] = [[] for _ in prompts]
  for tokens, active in stream(model, params, prompts, max_new_tokens=max_new_tokens,
                               sampling=sampling, key=key, stop_tokens=stop_tokens,
                               jrt_repeats=jrt_repeats, pad_id=pad_id):
    for row in np.flatnonzero(active):
      out[row].append(int(tokens[row]))
  return out
