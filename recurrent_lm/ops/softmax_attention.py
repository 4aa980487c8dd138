"""Causal softmax attention, full or sliding-window, with a fixed-shape KV cache.

For a query at absolute position ``i`` and a key at position ``j``:

    o_i = Σ_j p_ij v_j,    p_ij = softmax_j(scale · q_i·k_j)   over the visible j,
    j visible  ⇔  j ≤ i  and  i − j < window  and  segment_i = segment_j

(``window=None`` drops the middle condition; ``segment_ids=None`` puts every
token in segment 0). Query head ``h`` reads key/value head
``h // (H / Hkv)`` (grouped-query attention).

Decoding carries a :class:`KVCache` of capacity ``C``: the token at absolute
position ``p`` lives in slot ``p mod C``. With a sliding window a ring buffer
of ``C ≥ window`` slots always holds every key a new query can see. Full
attention needs ``C ≥`` the total length; a call that would push the cache
past ``C`` tokens returns NaN rather than attend to an incomplete history.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from recurrent_lm.ops import _checks


class KVCache(NamedTuple):
  """Keys and values of past tokens, in a ring buffer of ``C`` slots.

  Attributes:
    k: ``[B, C, Hkv, D]`` cached keys.
    v: ``[B, C, Hkv, Dv]`` cached values.
    positions: ``[B, C]`` int32 absolute position of the token in each slot;
      −1 marks an empty slot.
    segment_ids: ``[B, C]`` int32 segment id of the token in each slot.
    index: ``[]`` int32 number of tokens written so far (the absolute position
      of the next token).
  """
  k: jax.Array
  v: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  index: jax.Array


def init_kv_cache(batch_size, capacity, num_kv_heads, head_dim, dtype=jnp.float32,
                  value_dim=None) -> KVCache:
  """An empty cache of ``capacity`` slots; ``value_dim`` defaults to ``head_dim``."""
  _checks.check_positive_int("batch_size", batch_size)
  _checks.check_positive_int("capacity", capacity)
  _checks.check_positive_int("num_kv_heads", num_kv_heads)
  _checks.check_positive_int("head_dim", head_dim)
  value_dim = head_dim if value_dim is None else value_dim
  _checks.check_positive_int("value_dim", value_dim)
  return KVCache(
      k=jnp.zeros((batch_size, capacity, num_kv_heads, head_dim), dtype),
      v=jnp.zeros((batch_size, capacity, num_kv_heads, value_dim), dtype),
      positions=jnp.full((batch_size, capacity), -1, jnp.int32),
      segment_ids=jnp.zeros((batch_size, capacity), jnp.int32),
      index=jnp.zeros((), jnp.int32))


def _check_cache(cache, batch, num_kv_heads, head_dim, value_dim):
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache is a {type(cache).__name__}; expected a KVCache")
  capacity = cache.k.shape[1] if cache.k.ndim == 4 else "C"
  _checks.check_shape("cache.k", cache.k, (batch, capacity, num_kv_heads, head_dim))
  _checks.check_shape("cache.v", cache.v, (batch, capacity, num_kv_heads, value_dim))
  _checks.check_shape("cache.positions", cache.positions, (batch, capacity))
  _checks.check_shape("cache.segment_ids", cache.segment_ids, (batch, capacity))
  _checks.check_shape("cache.index", cache.index, ())


def _check_kv(k, v, segment_ids):
  _checks.check_floating("k", k)
  _checks.check_floating("v", v)
  if k.ndim != 4:
    raise ValueError(f"k has shape {_checks.shape_str(k.shape)}; expected [B, T, Hkv, D]")
  batch, time, num_kv_heads, _ = k.shape
  _checks.check_shape("v", v, (batch, time, num_kv_heads, "Dv"))
  _checks.check_segment_ids(segment_ids, batch, time)


def write_kv_cache(cache: KVCache, k, v, segment_ids=None) -> KVCache:
  """Writes ``T`` new tokens at absolute positions ``index … index+T−1``.

  Position ``p`` goes to slot ``p mod C``. When ``T > C`` only the last ``C``
  tokens are written, so no slot is written twice in one scatter.

  Args:
    cache: the cache to write into (capacity ``C``).
    k: ``[B, T, Hkv, D]`` new keys.
    v: ``[B, T, Hkv, Dv]`` new values.
    segment_ids: ``[B, T]`` integer segment ids; segment 0 if None.

  Returns:
    The cache with the new tokens written and ``index`` advanced by ``T``.
  """
  _check_kv(k, v, segment_ids)
  batch, time, num_kv_heads, head_dim = k.shape
  _check_cache(cache, batch, num_kv_heads, head_dim, v.shape[-1])
  capacity = cache.k.shape[1]
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, time), jnp.int32)
  kept = min(time, capacity)
  positions = cache.index + jnp.arange(time - kept, time, dtype=jnp.int32)
  slots = positions % capacity
  return KVCache(
      k=cache.k.at[:, slots].set(k[:, time - kept:].astype(cache.k.dtype),
                                 unique_indices=True),
      v=cache.v.at[:, slots].set(v[:, time - kept:].astype(cache.v.dtype),
                                 unique_indices=True),
      positions=cache.positions.at[:, slots].set(
          jnp.broadcast_to(positions, (batch, kept)), unique_indices=True),
      segment_ids=cache.segment_ids.at[:, slots].set(
          segment_ids[:, time - kept:].astype(jnp.int32), unique_indices=True),
      index=cache.index + time)


def _attend(q, k, v, *, scale, mask=None, is_causal=False, local_window_size=None):
  """``jax.nn.dot_product_attention`` that also accepts ``Dv ≠ D``."""
  head_dim, value_dim = q.shape[-1], v.shape[-1]
  width = max(head_dim, value_dim)

  # The library wants v shaped like k. Zero channels add nothing to q·k and
  # produce only output channels that are sliced off.
  def pad(x):
    return jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),))

  o = jax.nn.dot_product_attention(
      pad(q), pad(k.astype(q.dtype)), pad(v.astype(q.dtype)), mask=mask,
      scale=scale, is_causal=is_causal, local_window_size=local_window_size)
  return o[..., :value_dim]


def _blocked_window(q, k, v, *, window, segment_ids, scale):
  """Sliding-window attention without a cache in O(T·window) memory.

  Queries go in blocks of ``window``; block n sees key blocks n−1 and n, which
  hold every key within the window, masked by position and segment. The
  quadratic ``[T, T]`` form of ``jax.nn.dot_product_attention`` on CPU took
  as long for a window of 256 as for full attention at T = 8192.
  """
  batch, time, num_heads, _ = q.shape
  block = window
  n = -(-time // block)
  pad = n * block - time
  pad_t = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  to_blocks = lambda x: pad_t(x).reshape(batch, n, block, *x.shape[2:])
  with_previous = lambda x: jnp.concatenate(
      [jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], 1), x], 2)
  k2, v2 = with_previous(to_blocks(k)), with_previous(to_blocks(v))  # [B, n, 2L, Hkv, *]

  q_pos = np.arange(n * block).reshape(n, block)
  k_pos = np.concatenate([q_pos - block, q_pos], axis=1)  # [n, 2L]; < 0: before the row
  visible = ((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])
             & (q_pos[:, :, None] - k_pos[:, None, :] < window))  # [n, L, 2L]
  mask = jnp.broadcast_to(visible, (batch, n, block, 2 * block))
  if segment_ids is not None:
    seg = to_blocks(segment_ids)
    mask = mask & (seg[..., :, None] == with_previous(seg)[..., None, :])
  fold = lambda x: x.reshape(batch * n, *x.shape[2:])
  o = _attend(fold(to_blocks(q)), fold(k2), fold(v2), scale=scale,
              mask=fold(mask)[:, None])
  return o.reshape(batch, n * block, num_heads, -1)[:, :time]


def softmax_attention(q, k, v, *, window=None, segment_ids=None, cache=None,
                      scale=None):
  """Causal (optionally sliding-window) softmax attention.

      o_i = Σ_j softmax_j(scale · q_i·k_j) v_j   over keys j with
      j ≤ i,  i − j < window,  segment_i = segment_j

  Logits and the softmax are float32; the output has ``q``'s dtype.

  Without a cache the ``T`` tokens sit at positions ``0 … T−1``. With a cache
  they sit at ``index … index+T−1`` and also see the cached tokens (each
  cached slot is masked by its stored position and segment id); the returned
  cache holds them too. With ``window=None`` a call that brings the cache past
  its capacity (``index + T > C``) returns an all-NaN output, and so does
  every later call on that cache: a history that no longer fits is never
  attended to silently.

  Args:
    q: ``[B, T, H, D]`` queries.
    k: ``[B, T, Hkv, D]`` keys; ``H % Hkv == 0``.
    v: ``[B, T, Hkv, Dv]`` values.
    window: keys a query sees, itself included (``window=1``: only itself);
      None for full causal attention.
    segment_ids: ``[B, T]`` integer document ids; a query sees only keys with
      its own id (cached keys included). Segment 0 for every token if None.
    cache: a :class:`KVCache` from :func:`init_kv_cache` or a previous call;
      with a window its capacity must be at least ``window``.
    scale: logit scale; ``D ** -0.5`` if None.

  Returns:
    ``(o, cache)``: ``o`` ``[B, T, H, Dv]``, and the updated cache (None when
    called without one).
  """
  _checks.check_floating("q", q)
  if q.ndim != 4:
    raise ValueError(f"q has shape {_checks.shape_str(q.shape)}; expected [B, T, H, D]")
  batch, time, num_heads, head_dim = q.shape
  _checks.check_shape("k", k, (batch, time, "Hkv", head_dim))
  _check_kv(k, v, segment_ids)
  num_kv_heads = k.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(
        f"q has {num_heads} heads and k has {num_kv_heads}; expected the number of "
        "query heads to be a multiple of the number of key/value heads")
  if window is not None:
    _checks.check_positive_int("window", window)
  if scale is None:
    scale = head_dim ** -0.5

  if cache is None:
    if window is not None and time > 2 * window:
      return _blocked_window(q, k, v, window=window, segment_ids=segment_ids, scale=scale), None
    mask = None
    if segment_ids is not None:
      mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    o = _attend(q, k, v, scale=scale, mask=mask, is_causal=True,
                local_window_size=None if window is None else (window - 1, 0))
    return o, None

  _check_cache(cache, batch, num_kv_heads, head_dim, v.shape[-1])
  capacity = cache.k.shape[1]
  if window is not None and capacity < window:
    raise ValueError(
        f"cache has capacity {capacity}; expected at least window={window}")
  if segment_ids is None:
    segment_ids = jnp.zeros((batch, time), jnp.int32)
  segment_ids = segment_ids.astype(jnp.int32)

  q_pos = cache.index + jnp.arange(time, dtype=jnp.int32)
  key_pos = jnp.concatenate(
      [cache.positions, jnp.broadcast_to(q_pos, (batch, time))], axis=1)
  key_seg = jnp.concatenate([cache.segment_ids, segment_ids], axis=1)
  q_pos = q_pos[None, :, None]
  key_pos = key_pos[:, None, :]
  mask = (key_pos >= 0) & (key_pos <= q_pos)
  mask &= segment_ids[:, :, None] == key_seg[:, None, :]
  if window is not None:
    mask &= q_pos - key_pos < window
  o = _attend(q, jnp.concatenate([cache.k.astype(k.dtype), k], axis=1),
              jnp.concatenate([cache.v.astype(v.dtype), v], axis=1),
              scale=scale, mask=mask[:, None])
  if window is None:
    o = jnp.where(cache.index + time > capacity, jnp.nan, o)
  return o, write_kv_cache(cache, k, v, segment_ids)
