"""H3's diagonal SSM over key–value outer products, read by a query, in every form.

Per head, with ``q_t, k_t ∈ R^K``, ``v_t ∈ R^V`` and a complex diagonal
discrete SSM of ``M`` modes (``Ā, B̄, C ∈ C^M``, skip ``D ∈ R``), every entry
``(i, j)`` of ``k_t v_tᵀ`` drives its own copy of the SSM::

    X_t = Ā ⊙ X_{t−1} + B̄ ⊗ (k_t v_tᵀ)                   X ∈ C^{K×V×M}
    s_t = 2 Re(Σ_m C_m X_t[:, :, m]) + D k_t v_tᵀ        [K, V]
    o_t = q_tᵀ s_t                                        [V]

``2 Re`` counts each mode with its complex conjugate (S4D's conjugate pairs),
so ``M`` complex modes are a real SSM of size ``2M``. The system is time
invariant: ``s`` is the causal convolution of ``k vᵀ`` with the kernel

    K̄_0 = 2 Re(Σ_m C_m B̄_m) + D,      K̄_r = 2 Re(Σ_m C_m B̄_m Ā_m^r)   (r ≥ 1).

With ``segment_ids`` ``[B, T]``, X restarts at 0 where a new document starts;
the initial state flows into the first document of the row.

Implementations (``impl=``), all computing in float32:

* ``recurrent`` — token by token with ``lax.scan``, the complex state held as
  real and imaginary parts: the oracle and the decoding form.
* ``chunked``   — chunks of ``L = chunk_size``. Inside a chunk, key σ reaches
  query τ ≥ σ through the Toeplitz kernel: ``o_τ += K̄_{τ−σ} (q_τ·k_σ) v_σ``,
  a masked ``[L, L]`` score matrix per head, as in chunked linear attention.
  The state ``X_c`` entering chunk ``c`` reaches its position τ (0-based) as

      o_τ += q_τᵀ · 2 Re(Σ_m C_m Ā_m^{τ+1} X_c[:, :, m])

  (the ``C Ā^{t+1} X_0`` term of an initial state, for chunk 0), and the
  chunk states follow from one short scan over the ``T / L`` chunks:

      X_{c+1} = Ā^{ℓ_c} ⊙ X_c + Σ_{σ<ℓ_c} Ā^{ℓ_c−1−σ} B̄ ⊗ (k_σ v_σᵀ)

  (``ℓ_c`` the chunk's length: ``L``, or what is left for the last one).
  With ``segment_ids``, scores pair only positions of one document, a
  position reads ``X_c`` only if no document started in the chunk before
  it, only the chunk's last document enters ``X_{c+1}``, and ``X_c`` is
  carried only through a chunk in which no document starts. Powers of ``Ā``
  are ``exp(r log Ā)`` with ``r ≤ L``, so nothing grows: ``|Ā| < 1``.
  Memory: the scores are ``B·T·H·L`` floats, the chunk states
  ``B·(T/L)·H·K·V·M`` complex numbers.
* ``auto``      — ``recurrent`` for a single token (decoding), else the
  first supported in the backend's order (``chunked`` everywhere so far).

An FFT long convolution of the whole sequence would replace the ``O(T·L)``
Toeplitz part by ``O(T log T)``, but the final state (returned by every call)
and the initial state's term already cost ``O(T·M)`` per channel, and packed
rows (``segment_ids``) break the time invariance the FFT relies on: the
chunked form serves every call.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from recurrent_lm.ops import _checks
from recurrent_lm.ops._dispatch import Registry

# Shared conventions of the private implementations below:
#   q, k [B, T, H, K], v [B, T, H, V] float32; a, b, c [H, M] complex64;
#   d [H] float32; x0 [B, H, K, V, M] complex64; doc [B, T] int32 document
#   index (non-decreasing, 0 at t = 0) or None for one document.
# Each returns (o [B, T, H, V] float32, x_final [B, H, K, V, M] complex64).


def _recurrent(q, k, v, a, b, c, d, x0, doc, chunk_size):
  del chunk_size
  starts = None if doc is None else jnp.pad(doc[:, 1:] != doc[:, :-1], ((0, 0), (1, 0)))
  # Complex arithmetic as real pairs: [H, 1, 1, M] against X [B, H, K, V, M].
  a_re, a_im, b_re, b_im, c_re, c_im = (
      p[:, None, None, :] for p in (a.real, a.imag, b.real, b.imag, c.real, c.imag))

  def step(x, inputs):
    x_re, x_im = x
    q_t, k_t, v_t, start = inputs
    if start is not None:
      keep = ~start[:, None, None, None, None]
      x_re, x_im = jnp.where(keep, x_re, 0.0), jnp.where(keep, x_im, 0.0)
    u = (k_t[..., :, None] * v_t[..., None, :])[..., None]          # [B, H, K, V, 1]
    x_re, x_im = (a_re * x_re - a_im * x_im + b_re * u,
                  a_re * x_im + a_im * x_re + b_im * u)
    s = 2.0 * jnp.sum(c_re * x_re - c_im * x_im, axis=-1)           # [B, H, K, V]
    o = (jnp.einsum("bhk,bhkv->bhv", q_t, s)
         + d[:, None] * jnp.sum(q_t * k_t, -1)[..., None] * v_t)
    return (x_re, x_im), o

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  (x_re, x_im), o = lax.scan(step, (x0.real, x0.imag),
                             (time_major(q), time_major(k), time_major(v),
                              None if starts is None else time_major(starts)))
  return time_major(o), lax.complex(x_re, x_im)


def _chunked(q, k, v, a, b, c, d, x0, doc, chunk_size):
  batch, time, heads, dk = q.shape
  dv = v.shape[-1]
  size = min(chunk_size, time)
  n = -(-time // size)
  pad = n * size - time
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    if doc is not None:
      doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")
  q, k, v = (x.reshape(batch, n, size, heads, -1) for x in (q, k, v))
  lengths = np.full(n, size)
  lengths[-1] = time - (n - 1) * size

  power = jnp.exp(jnp.arange(size + 1, dtype=jnp.float32)[:, None, None]
                  * jnp.log(a)[None])                                  # Ā^r: [L+1, H, M]
  kernel = 2.0 * jnp.real(jnp.einsum("hm,rhm->rh", c * b, power[:size]))
  kernel = kernel.at[0].add(d)                                          # [L, H]
  lag = np.arange(size)[:, None] - np.arange(size)[None, :]
  toeplitz = jnp.where(lag[..., None] >= 0, kernel[np.maximum(lag, 0)], 0.0)  # [L, L, H]
  scores = jnp.einsum("bcthk,bcshk->bchts", q, k) * jnp.moveaxis(toeplitz, -1, 0)

  if doc is not None:
    doc = doc.reshape(batch, n, size)
    doc_before = jnp.concatenate([jnp.zeros((batch, 1), doc.dtype), doc[:, :-1, -1]], 1)
    scores = jnp.where((doc[:, :, :, None] == doc[:, :, None, :])[:, :, None], scores, 0.0)
  o = jnp.einsum("bchts,bcshv->bcthv", scores, v)

  # Chunk states: keys reach the chunk's end with Ā^{ℓ−1−σ} B̄.
  exponent = lengths[:, None] - 1 - np.arange(size)[None, :]            # [n, L]
  weight = jnp.where((exponent >= 0)[..., None, None],
                     b * power[np.maximum(exponent, 0)], 0.0)           # [n, L, H, M]
  kv = k[..., :, None] * v[..., None, :]                                # [B, n, L, H, K, V]
  decay = power[lengths][:, None, :, None, None, :]                     # [n, 1, H, 1, 1, M]
  if doc is not None:
    kv = jnp.where((doc == doc[:, :, -1:])[..., None, None, None], kv, 0.0)
    carried = (doc[:, :, -1] == doc_before).T                           # [n, B]
    decay = jnp.where(carried[:, :, None, None, None, None], decay, 0.0)
  local = jnp.einsum("cshm,bcshkv->cbhkvm", weight.astype(a.dtype), kv.astype(a.dtype))

  def carry_step(x, inputs):
    decay_c, local_c = inputs
    return decay_c * x + local_c, x

  x_final, x_enter = lax.scan(carry_step, x0, (decay, local))          # x_enter: [n, B, H, K, V, M]

  read = c * power[1:]                                                  # C Ā^{τ+1}: [L, H, M]
  z = 2.0 * jnp.real(jnp.einsum("thm,cbhkvm->bcthkv", read, x_enter))
  if doc is not None:
    z = jnp.where((doc == doc_before[:, :, None])[..., None, None, None], z, 0.0)
  o = o + jnp.einsum("bcthk,bcthkv->bcthv", q, z)
  return o.reshape(batch, n * size, heads, dv)[:, :time], x_final


REGISTRY = Registry(
    "h3_ssm",
    auto_order={"cpu": ("chunked", "recurrent"), "default": ("chunked", "recurrent")})
REGISTRY.register("recurrent", _recurrent)
REGISTRY.register("chunked", _chunked)


def h3_ssm(q, k, v, a, b, c, d=None, *, initial_state=None, segment_ids=None,
           chunk_size=64, impl="auto"):
  """The diagonal SSM over ``k vᵀ`` read by ``q`` (module docstring).

  Args:
    q: ``[B, T, H, K]`` queries.
    k: ``[B, T, H, K]`` keys.
    v: ``[B, T, H, V]`` values.
    a: ``[H, M]`` complex discrete state matrix ``Ā`` (diagonal), ``|Ā| < 1``.
    b: ``[H, M]`` complex discrete input vector ``B̄``.
    c: ``[H, M]`` complex output vector ``C``.
    d: ``[H]`` real skip ``D``; none if None.
    initial_state: ``[B, H, K, V, M, 2]`` the state ``X`` as (real, imaginary)
      parts; zeros if None.
    segment_ids: ``[B, T]`` integer document ids; X restarts at 0 where the id changes.
    chunk_size: chunk length of ``impl="chunked"``.
    impl: ``"recurrent" | "chunked" | "auto"``.

  Returns:
    ``(o, state)``: ``o`` ``[B, T, H, V]`` in the promoted dtype of q, k, v
    and the final state ``[B, H, K, V, M, 2]`` float32.
  """
  batch, time, heads, dk, dv = _checks.check_qkv(q, k, v)
  if a.ndim != 2 or a.shape[0] != heads:
    raise ValueError(f"a has shape {_checks.shape_str(a.shape)}; expected [{heads}, M]")
  modes = a.shape[1]
  for name, p in (("a", a), ("b", b), ("c", c)):
    if not jnp.issubdtype(p.dtype, jnp.complexfloating):
      raise TypeError(f"{name} has dtype {p.dtype}; expected a complex dtype")
    _checks.check_shape(name, p, (heads, modes))
  if d is not None:
    _checks.check_floating("d", d)
    _checks.check_shape("d", d, (heads,))
  if initial_state is not None:
    _checks.check_floating("initial_state", initial_state)
    _checks.check_shape("initial_state", initial_state, (batch, heads, dk, dv, modes, 2))
  _checks.check_segment_ids(segment_ids, batch, time)
  _checks.check_positive_int("chunk_size", chunk_size)
  if impl == "auto" and time == 1:
    impl = "recurrent"
  chosen = REGISTRY.resolve(impl, time=time)

  out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  a, b, c = (p.astype(jnp.complex64) for p in (a, b, c))
  d = jnp.zeros((heads,), jnp.float32) if d is None else d.astype(jnp.float32)
  if initial_state is None:
    x0 = jnp.zeros((batch, heads, dk, dv, modes), jnp.complex64)
  else:
    x0 = lax.complex(initial_state[..., 0].astype(jnp.float32),
                     initial_state[..., 1].astype(jnp.float32))
  doc = (None if segment_ids is None
         else jnp.cumsum(_checks.segment_starts(segment_ids), axis=1, dtype=jnp.int32))
  o, x_final = chosen.fn(q, k, v, a, b, c, d, x0, doc, chunk_size)
  return o.astype(out_dtype), jnp.stack([x_final.real, x_final.imag], -1)
