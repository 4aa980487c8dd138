"""The n-gram head of In-Context Language Learning (Akyürek et al., 2024) as a mixer.

An n-gram head is an induction head of order n, hard-wired: position ``i``
attends uniformly to every earlier position ``p`` whose n predecessors equal
the n inputs ending at ``i``, and reads the input there — the token that
followed an earlier occurrence of the current n-gram. For the mixer input
``x`` ``[B, T, D]`` and each order ``n`` of ``orders = (n_1, …, n_K)``::

    M^n_ip = 1[p < i] · Π_{k=0}^{n−1} 1[x_{i−k} ≡ x_{p−1−k}]      every index in i's document
    h^n_i  = Σ_p M^n_ip x_p / max(Σ_p M^n_ip, 1)                   0 where nothing matched
    y_i    = W0 [h^{n_1}_i; …; h^{n_K}_i] + b0 + W1 x_i + b1

with ``h`` ``[B, T, K, D]``, ``W0`` ``[K, D, D]``, ``W1`` ``[D, D]``. The read
position is strictly before ``i`` (``p ≤ i − 1``, so the n-gram ending at
``i − 1`` never matches), and an n-gram must lie inside the document: for
``i − n + 1`` or ``p − n`` before the document start nothing matches.

Reference: ``Ngram`` and ``induction_head`` of the paper's code
(github.com/berlino/seq_icl, ``src/models/sequence/rnn/ngram.py``):
``y = t0(h) + t1(x)`` with ``t0, t1`` linear layers with bias, the values
the layer's own input ``x`` (no value projection), the match built from the
model's input token ids (at whatever depth the layer sits), a row without
a match giving ``h = 0`` (``nan_to_num`` of 0/0), and one order per layer
(the DFA hybrids stack 1-, 2- and 3-gram layers after a first regular layer).
``orders=(n,)`` is that layer exactly, up to how a match is found.

How the mixer knows the n-gram: the language model passes its token ids
(``tokens``) to this mixer, which matches on them at any depth, as the
reference does; several orders may share one mixer (``orders=(1, 2, 3)``
stands for the reference's stacked 1-, 2-, 3-gram layers). Called without
ids (a mixer on its own), ``≡`` is *bitwise equality of the input vectors*
(cast to ``dtype``): exact for a first layer, whose input ``Norm(E[token])``
is a function of the token alone, and rarely true deeper. Equality has no
tolerance (``−0.0 ≢ 0.0``; one ulp breaks a match). It is found through a
64-bit hash of each vector's bits (two words, each a wrapping uint32 sum of
murmur3-mixed ``bits_d ⊕ key_d``): integer sums are exact in any order, so
a vector hashes the same in any call, shape or device; distinct vectors
collide with probability ~2⁻⁶⁴ per pair (heuristically: murmur3's mixer is
not a proven universal hash). ``M`` is piecewise constant in
``x``, so gradients flow through the values and ``W1 x`` only (as in the
reference, whose mask comes from token ids).

The state is a cache of the last ``max_len`` inputs (``NGramCache``: values,
match keys, positions, segment ids, index), like full attention's. A call with a state that brings
the cache past ``max_len`` tokens returns NaN, as does every later call (a
call without a state reads no cache and takes any T): a history that
no longer fits is never averaged over silently. Cost: ``O(T·C·(D·K + W·n))``
per call, like attention.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recurrent_lm.layers import _common
from recurrent_lm.ops import _checks

HASH_WORDS = 2   # uint32 words per vector hash: 64 bits


class NGramCache(NamedTuple):
  """Past inputs of an n-gram head, in a ring of ``C`` slots (slot ``p mod C``).

  Attributes:
    values: ``[B, C, D]`` inputs ``x_p``.
    keys: ``[B, C, HASH_WORDS]`` uint32 match keys of the slots: the hashes
      of the inputs, or the token ids when the model passes them.
    positions: ``[B, C]`` int32 absolute position in each slot; −1 marks an
      empty slot.
    segment_ids: ``[B, C]`` int32 document id in each slot.
    index: ``[]`` int32 number of tokens written (the next position).
  """
  values: jax.Array
  keys: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  index: jax.Array


def init_ngram_cache(batch_size: int, capacity: int, d_model: int,
                     dtype=jnp.float32) -> NGramCache:
  """An empty cache of ``capacity`` slots."""
  _checks.check_positive_int("batch_size", batch_size)
  _checks.check_positive_int("capacity", capacity)
  _checks.check_positive_int("d_model", d_model)
  return NGramCache(values=jnp.zeros((batch_size, capacity, d_model), dtype),
                    keys=jnp.zeros((batch_size, capacity, HASH_WORDS), jnp.uint32),
                    positions=jnp.full((batch_size, capacity), -1, jnp.int32),
                    segment_ids=jnp.zeros((batch_size, capacity), jnp.int32),
                    index=jnp.zeros((), jnp.int32))


def write_ngram_cache(cache: NGramCache, x, keys, segment_ids) -> NGramCache:
  """Writes ``x`` ``[B, T, D]`` and its keys at positions ``index … index+T−1``.

  When ``T > C`` only the last ``C`` tokens are written (one scatter writes
  a slot once); ``index`` advances by ``T``.
  """
  batch, time, _ = x.shape
  capacity = cache.values.shape[1]
  kept = min(time, capacity)
  positions = cache.index + jnp.arange(time - kept, time, dtype=jnp.int32)
  slots = positions % capacity
  return NGramCache(
      values=cache.values.at[:, slots].set(x[:, time - kept:].astype(cache.values.dtype),
                                           unique_indices=True),
      keys=cache.keys.at[:, slots].set(keys[:, time - kept:], unique_indices=True),
      positions=cache.positions.at[:, slots].set(
          jnp.broadcast_to(positions, (batch, kept)), unique_indices=True),
      segment_ids=cache.segment_ids.at[:, slots].set(
          segment_ids[:, time - kept:].astype(jnp.int32), unique_indices=True),
      index=cache.index + time)


def _fmix32(z):
  """murmur3's finaliser: a bijection of uint32 with full avalanche (numpy or jax)."""
  z = z ^ (z >> 16)
  z = z * np.uint32(0x85EBCA6B)
  z = z ^ (z >> 13)
  z = z * np.uint32(0xC2B2AE35)
  return z ^ (z >> 16)


def _hash_keys(width: int) -> np.ndarray:
  """``[HASH_WORDS, width]`` distinct uint32 keys, one per word and bit-channel."""
  i = np.arange(HASH_WORDS * width, dtype=np.uint32).reshape(HASH_WORDS, width)
  return _fmix32(i * np.uint32(0x9E3779B9) + np.uint32(0x7F4A7C15))


def token_hashes(x):
  """``[..., D]`` floats → ``[..., HASH_WORDS]`` uint32 hashes of their bits.

  Equal bit patterns give equal hashes; each word is a wrapping sum over the
  bit-channels, exact in any summation order.
  """
  x = lax.stop_gradient(x)
  size = jnp.dtype(x.dtype).itemsize
  if size == 2:
    bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif size in (4, 8):
    bits = lax.bitcast_convert_type(x, jnp.uint32).reshape(*x.shape[:-1], -1)
  else:
    raise TypeError(f"x has dtype {x.dtype}; expected a 16-, 32- or 64-bit float")
  keys = _hash_keys(bits.shape[-1])
  return jnp.stack([jnp.sum(_fmix32(bits ^ keys[w]), axis=-1, dtype=jnp.uint32)
                    for w in range(HASH_WORDS)], axis=-1)


def match_keys(x, tokens=None):
  """``[B, T, HASH_WORDS]`` uint32 keys: token ids when given, else hashes of ``x``'s bits."""
  if tokens is None:
    return token_hashes(x)
  ids = tokens.astype(jnp.uint32)[..., None]
  return jnp.concatenate([ids, jnp.zeros_like(ids)] * (HASH_WORDS // 2), axis=-1)


def ngram_average(values, hashes, positions, segment_ids, query_slots, orders: Sequence[int],
                  dtype):
  """``h^n`` of the module docstring for queries stored among the slots.

  Args:
    values: ``[B, S, D]`` inputs in their slots (the queries' own included).
    hashes: ``[B, S, HASH_WORDS]`` their match keys (:func:`match_keys`).
    positions: ``[B, S]`` int32 position of each slot, −1 when empty.
    segment_ids: ``[B, S]`` int32 document of each slot.
    query_slots: ``[T]`` int slots of the queries; None when the queries are
      all the slots, in order.
    orders: the orders n, in the output's order.
    dtype: the values are rounded to it; sums are in at least float32.

  Returns:
    ``[B, T, K, D]`` float32 (float64 for float64 inputs) uniform averages,
    0 where a query has no match.
  """
  longest = max(orders)
  present = positions >= 0
  # hist[k][s]: hash of the input k positions before slot s's; ok[k][s]: the
  # inputs s−k … s are all stored and all in slot s's document.
  hist, ok, run = [hashes], [present], present
  for k in range(1, longest + 1):
    back = lambda a: jnp.roll(a, k, axis=1)
    run = (run & back(present) & (back(positions) == positions - k)
           & (back(segment_ids) == segment_ids))
    hist.append(back(hashes))
    ok.append(run)
  at_query = (lambda a: a) if query_slots is None else (lambda a: a[:, query_slots])
  query_pos, query_seg = at_query(positions), at_query(segment_ids)
  mask = (present[:, None, :] & (positions[:, None, :] < query_pos[:, :, None])
          & (segment_ids[:, None, :] == query_seg[:, :, None]))         # [B, T, S]
  masks = {}
  for k in range(longest):
    same = jnp.all(at_query(hist[k])[:, :, None, :] == hist[k + 1][:, None, :, :], axis=-1)
    mask = mask & same & at_query(ok[k])[:, :, None] & ok[k + 1][:, None, :]
    masks[k + 1] = mask
  mask = jnp.stack([masks[n] for n in orders], axis=1)                 # [B, K, T, S]
  # The 0/1 mask times values rounded to ``dtype``, summed in at least float32
  # (counts reach C); upcast rather than a mixed-precision dot, which XLA's CPU
  # backend lacks.
  acc = jnp.promote_types(dtype, jnp.float32)
  total = jnp.einsum("bkts,bsd->btkd", mask.astype(acc), values.astype(dtype).astype(acc))
  count = jnp.sum(mask, axis=-1, dtype=jnp.int32).transpose(0, 2, 1)  # [B, T, K]
  return total / jnp.maximum(count, 1).astype(acc)[..., None]


def _check_cache(cache, batch: int, d_model: int) -> None:
  if not isinstance(cache, NGramCache):
    raise TypeError(f"state is a {type(cache).__name__}; expected an NGramCache")
  capacity = cache.values.shape[1] if cache.values.ndim == 3 else "C"
  _checks.check_shape("state.values", cache.values, (batch, capacity, d_model))
  _checks.check_shape("state.keys", cache.keys, (batch, capacity, HASH_WORDS))
  _checks.check_shape("state.positions", cache.positions, (batch, capacity))
  _checks.check_shape("state.segment_ids", cache.segment_ids, (batch, capacity))
  _checks.check_shape("state.index", cache.index, ())


class NGramHead(nn.Module):
  """Hard-wired n-gram heads of one or more orders (module docstring).

  Attributes:
    d_model: model width D.
    orders: the n-gram order n, or a tuple of distinct orders (one head
      each, summed through ``W0``); the paper's hybrids use 1, 2 and 3.
    max_len: cache capacity, the longest sequence a cached call can continue
      (NaN past it); a call without a state reads no cache and takes any T.
    use_bias: biases ``b0``, ``b1`` (the reference's linear layers have them).
    dtype: compute dtype, the dtype of the cache and of the compared vectors.
    param_dtype: dtype of the parameters.
  """
  reads_tokens: ClassVar[bool] = True   # the LM passes ``tokens`` to this mixer

  d_model: int
  orders: int | tuple[int, ...] = 1
  max_len: int = 2048
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _orders(self) -> tuple[int, ...]:
    orders = (self.orders,) if isinstance(self.orders, int) else tuple(self.orders)
    if (not orders or len(set(orders)) != len(orders)
        or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in orders)):
      raise ValueError(f"orders={self.orders!r}; expected a positive int or a non-empty "
                       "tuple of distinct positive ints")
    _checks.check_positive_int("max_len", self.max_len)
    return orders

  def init_state(self, batch_size: int, dtype=None) -> NGramCache:
    """An empty cache of ``max_len`` slots, values in ``dtype`` (``self.dtype`` if None)."""
    self._orders()
    return init_ngram_cache(batch_size, self.max_len, self.d_model,
                            self.dtype if dtype is None else dtype)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None, tokens=None):
    """Averages the inputs that followed earlier occurrences of each n-gram.

    Args:
      x: ``[B, T, D]``.
      state: an ``NGramCache`` from ``init_state`` or a previous call, or None
        at a sequence start.
      segment_ids: ``[B, T]`` document ids; matches stay inside a document.
      tokens: ``[B, T]`` int token ids to match on (the reference's keys, at
        any depth; the language model passes them); None matches the bits of ``x``.

    Returns:
      ``(y, cache)``: ``y`` ``[B, T, D]`` in ``dtype`` (NaN once the cache
      overflows) and the cache holding ``x`` too.
    """
    _common.check_input(x, self.d_model)
    orders = self._orders()
    batch, time, _ = x.shape
    _checks.check_segment_ids(segment_ids, batch, time)
    segment_ids = (jnp.zeros((batch, time), jnp.int32) if segment_ids is None
                   else segment_ids.astype(jnp.int32))
    x = x.astype(self.dtype)
    if tokens is not None:
      _checks.check_shape("tokens", tokens, (batch, time))
    keys = match_keys(x, tokens)
    if state is None:
      # Without a cache to read, the tokens of this call are all there is.
      positions = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))
      h = ngram_average(x, keys, positions, segment_ids, None, orders, self.dtype)
      cache = write_ngram_cache(self.init_state(batch), x, keys, segment_ids)
    else:
      _check_cache(state, batch, self.d_model)
      capacity = state.values.shape[1]
      cache = write_ngram_cache(state, x, keys, segment_ids)
      slots = (state.index + jnp.arange(time, dtype=jnp.int32)) % capacity
      h = ngram_average(cache.values, cache.keys, cache.positions, cache.segment_ids, slots,
                        orders, self.dtype)
      h = jnp.where(state.index + time > capacity, jnp.nan, h)
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
    y = _common.dense(self.d_model, (None, None, "embed"), axis=(-2, -1), name="ngram_proj",
                      **proj)(h.astype(self.dtype))
    y = y + _common.dense(self.d_model, (None, "embed"), name="input_proj", **proj)(x)
    return y, cache
