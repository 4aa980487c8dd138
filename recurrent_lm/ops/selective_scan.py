"""Mamba's selective state space (S6), in every form.

Per channel ``d`` and state dimension ``n``, with ``Δ = dt`` (already
positive: the caller applies ``softplus(raw + dt_bias)``)::

    h_t[d, n] = exp(Δ_t[d] · A[d, n]) · h_{t−1}[d, n] + Δ_t[d] · B_t[n] · x_t[d]
    y_t[d]    = Σ_n C_t[n] · h_t[d, n] + D[d] · x_t[d]

Layouts (``D`` also names the channel count, as in Mamba):

* ``x``, ``dt``: ``[B, T, D]`` — inputs and step sizes, one per channel and time.
* ``A``: ``[D, N]`` — the diagonal state matrix, entries ≤ 0 (``−exp(A_log)``),
  so every log-decay ``Δ·A`` is ≤ 0.
* ``B``, ``C``: ``[B, T, N]``, shared by every channel (Mamba-1), or
  ``[B, T, G, N]`` with ``G`` dividing ``D``: channel ``d`` reads group
  ``d // (D/G)`` (contiguous blocks of channels, Mamba's ``(G H)`` order).
* ``D``: ``[D]`` skip weights, or None for no skip.
* state ``h``: ``[B, D, N]`` float32 whatever the input dtype.

With ``segment_ids`` ``[B, T]`` the state resets where a new document starts
(the decay is taken as 0 there); position 0 continues ``initial_state``.

Implementations (``impl=``), all computing in float32:

* ``recurrent``   — ``lax.scan`` token by token: the oracle. The forward holds
  one ``[B, D, N]`` state; its autodiff keeps ~5 ``[B, T, D, N]``-sized
  buffers (XLA's figure on CPU).
* ``associative`` — :func:`linear_scan` (``impl="associative"``) on the
  expanded ``a = e^{Δ A}``, ``b = Δ B x`` of shape ``[B, T, D, N]``, then
  ``y = Σ_n C h``: O(log T) depth, but it materialises ``T·D·N`` floats,
  ~14 such buffers forward + backward (XLA's figure on CPU). The backward is
  the adjoint recurrence, one reverse associative scan (:func:`_expanded_scan`).
* ``chunked``     — one ``lax.scan`` over chunks of length ``L`` carrying the
  state. Inside a chunk, with ``s_i = Σ_{j≤i} Δ_j`` the in-chunk cumulated
  step of each channel (so ``s_i A`` ``[L, D, N]`` are the cumulated
  log-decays, all ≤ 0)::

      y_i   = Σ_n C_i (e^{s_i A} ⊙ h_in)  +  Σ_{j≤i} Δ_j x_j Σ_n C_i B_j e^{(s_i − s_j) A}
      h_out = e^{s_L A} ⊙ h_in  +  Σ_j e^{(s_L − s_j) A} ⊙ B_j Δ_j x_j

  as einsums over the chunk. Exponents are differences of ``s`` times
  ``A`` — never a difference of two large cumulated log-decays, which
  would cost the A-gradient its precision — and all ≤ 0; pairs across a
  document boundary and ``j > i`` are masked before ``exp``, nothing is
  divided by a decay. The chunk body is recomputed in the backward, so only
  one chunk's ``[L, L, D, N]`` and the ``T/L`` chunk states ever exist:
  forward + backward memory per token is ~0.4 of one ``[D, N]`` state
  (XLA's figure on CPU, ``L=8, D=8, N=64``), never O(T·D·N). The price is ~``L`` times
  the element-wise work (and ``exp`` count) of the recurrence; the chunk
  length trades that against ``T/L`` sequential steps.
* ``auto``        — the fastest that supports the call on this backend
  (:data:`REGISTRY`, with the CPU measurements behind its order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from recurrent_lm.ops import _checks
from recurrent_lm.ops._dispatch import Registry
from recurrent_lm.ops.linear_scan import linear_scan

# Chunk length of ``impl="chunked"``: 8 was fastest forward + backward on CPU
# among 2, 4, 8, 16, 32 (T=2048, D=256, N=16).
_CHUNK = 8


# Shared conventions of the private implementations below, all float32:
#   x, dt [B, T, G, P] (P = D/G channels per group); A [G, P, N];
#   B, C [B, T, G, N]; h0 [B, G, P, N]; doc [B, T] int32 document index,
#   non-decreasing, 0 at t = 0, or None for a single document.
# Each returns (y [B, T, G, P] without the skip term, h_final [B, G, P, N]).


def _recurrent(x, dt, A, B, C, h0, doc, *, chunk_size):
  del chunk_size
  reset = (jnp.zeros(x.shape[:2], bool) if doc is None
           else _checks.segment_starts(doc))

  def step(h, inputs):
    x_t, dt_t, B_t, C_t, reset_t = inputs
    decay = jnp.exp(dt_t[..., None] * A)  # [B, G, P, N]
    decay = jnp.where(reset_t[:, None, None, None], 0.0, decay)
    h = decay * h + (dt_t * x_t)[..., None] * B_t[:, :, None, :]
    return h, jnp.einsum("bgpn,bgn->bgp", h, C_t)

  time_major = lambda a: jnp.moveaxis(a, 1, 0)
  h_final, y = lax.scan(step, h0, tuple(map(time_major, (x, dt, B, C, reset))))
  return time_major(y), h_final


@jax.custom_vjp
def _expanded_scan(a, b, h0):
  """``h_t = a_t ⊙ h_{t−1} + b_t`` over axis 1 with ``linear_scan``'s
  associative form, and its adjoint as the backward.

  The adjoint of a linear recurrence is the same recurrence run backwards:
  ``λ_t = ∂L/∂h_t + a_{t+1} ⊙ λ_{t+1}``, then ``∂L/∂b_t = λ_t``,
  ``∂L/∂a_t = λ_t ⊙ h_{t−1}`` and ``∂L/∂h0 = a_0 ⊙ λ_0``: one reverse
  associative scan instead of the transpose of every slice of the forward's.
  On CPU (T=2048, D=256, N=16) it runs as fast as autodiff and compiles in
  ~60% of the time.
  """
  return linear_scan(a, b, h0, impl="associative")


def _expanded_scan_fwd(a, b, h0):
  h, h_last = linear_scan(a, b, h0, impl="associative")
  return (h, h_last), (a, h, h0)


def _expanded_scan_bwd(residuals, cotangents):
  a, h, h0 = residuals
  d_h, d_last = cotangents
  d_h = d_h.at[:, -1].add(d_last)
  a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
  adjoint, _ = linear_scan(a_next, d_h, impl="associative", reverse=True)
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
  return adjoint * h_prev, adjoint, a[:, 0] * adjoint[:, 0]


_expanded_scan.defvjp(_expanded_scan_fwd, _expanded_scan_bwd)


def _associative(x, dt, A, B, C, h0, doc, *, chunk_size):
  del chunk_size
  a = jnp.exp(dt[..., None] * A)  # [B, T, G, P, N]
  if doc is not None:
    a = jnp.where(_checks.segment_starts(doc)[..., None, None, None], 0.0, a)
  b = (dt * x)[..., None] * B[:, :, :, None, :]
  h, h_final = _expanded_scan(a, b, h0)
  return jnp.einsum("btgpn,btgn->btgp", h, C), h_final


def _masked_exp(mask, exponent):
  """``exp(exponent)`` where ``mask``, else 0, never exponentiating a masked
  (possibly large positive) value, so gradients stay finite."""
  return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


def _chunk_step(A, h_in, inputs):
  """One chunk of the chunked form (module docstring).

  h_in: ``[B, G, P, N]``; inputs: ``u = Δ·x``, ``dt`` ``[B, L, G, P]``,
  ``B``, ``C`` ``[B, L, G, N]`` and the masks ``(sees_state [B, L],
  reaches_end [B, L], same_doc [B, L, L])`` or None.
  Returns ``(h_out, y [B, L, G, P])``.
  """
  u, dt, B, C, masks = inputs
  chunk = u.shape[1]
  s = jnp.cumsum(dt, axis=1)  # [B, L, G, P]
  b = s[..., None] * A  # [B, L, G, P, N], ≤ 0
  b_last = b[:, -1]
  causal = np.tril(np.ones((chunk, chunk), bool))
  if masks is None:
    sees_state = reaches_end = None
    pairs = causal[None, :, :, None, None, None]
  else:
    sees_state, reaches_end, same_doc = (m[(...,) + (None,) * 3] for m in masks)
    pairs = causal[None, :, :, None, None, None] & same_doc

  # Intra-chunk: the exponent (s_i − s_j)·A is ≤ 0 for j ≤ i.
  gap = s[:, :, None] - s[:, None, :]  # [B, Li, Lj, G, P]
  decay = _masked_exp(pairs, gap[..., None] * A)  # [B, Li, Lj, G, P, N]
  y = jnp.einsum("bign,bjgn,bijgpn,bjgp->bigp", C, B, decay, u)

  # The entering state, read by every position of its document.
  read = jnp.exp(b) if sees_state is None else jnp.where(sees_state, jnp.exp(b), 0.0)
  y = y + jnp.einsum("blgn,blgpn,bgpn->blgp", C, read, h_in)

  # (s_L − s_j)·A rather than b_L − b_j: the A-gradient then never
  # subtracts two large sums.
  to_end_exponent = (s[:, -1:] - s)[..., None] * A
  to_end = (jnp.exp(to_end_exponent) if reaches_end is None
            else _masked_exp(reaches_end, to_end_exponent))
  keep = (jnp.exp(b_last) if sees_state is None
          else jnp.where(sees_state[:, -1], jnp.exp(b_last), 0.0))
  h_out = keep * h_in + jnp.einsum("bjgpn,bjgn,bjgp->bgpn", to_end, B, u)
  return h_out, y


def _chunked(x, dt, A, B, C, h0, doc, *, chunk_size):
  batch, time, groups, width = x.shape
  chunk = min(chunk_size, time)
  n = -(-time // chunk)
  pad = n * chunk - time
  u = dt * x
  if pad:
    # Δ = 0 keeps the state and B = u = 0 adds nothing: the padding leaves
    # the final state untouched.
    pad_t = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    u, dt, B, C = pad_t(u), pad_t(dt), pad_t(B), pad_t(C)
    if doc is not None:
      doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")

  # [B, n·L, ...] -> [n, B, L, ...]
  to_chunks = lambda a: jnp.moveaxis(a.reshape(batch, n, chunk, *a.shape[2:]), 1, 0)
  if doc is None:
    masks = None
  else:
    doc = doc.reshape(batch, n, chunk)
    doc_in = jnp.concatenate([doc[:, :1, 0], doc[:, :-1, -1]], axis=1)  # doc of h_in
    masks = tuple(jnp.moveaxis(m, 1, 0) for m in (
        doc == doc_in[..., None],  # sees_state [B, n, L]
        doc == doc[:, :, -1:],  # reaches_end
        doc[:, :, :, None] == doc[:, :, None, :]))  # same_doc [B, n, L, L]
  step = jax.checkpoint(lambda h, inputs: _chunk_step(A, h, inputs))
  h_final, y = lax.scan(step, h0, (to_chunks(u), to_chunks(dt), to_chunks(B),
                                   to_chunks(C), masks))
  y = jnp.moveaxis(y, 0, 1).reshape(batch, n * chunk, groups, width)[:, :time]
  return y, h_final


REGISTRY = Registry(
    "selective_scan",
    # CPU, forward + backward (forward alone), B=1, T=2048, D=256, N=16,
    # float32, median of 7 after warm-up, 2 shared cores: recurrent 565 ms
    # (21 ms), chunked (L=8) 867 ms (67 ms), associative 1449 ms (157 ms).
    # No accelerator was measured: there the order is the usual expectation.
    auto_order={"cpu": ("recurrent", "chunked", "associative"),
                "default": ("pallas", "chunked", "associative", "recurrent")})
REGISTRY.register("recurrent", _recurrent)
REGISTRY.register("associative", _associative)
REGISTRY.register("chunked", _chunked)


def _check_signs(dt, A):
  """Δ ≥ 0 and A ≤ 0 keep every log-decay ``Δ·A`` ≤ 0. Checked on concrete
  values only: under ``jit`` they are unknown."""
  if not isinstance(dt, jax.core.Tracer):
    worst = float(jnp.min(dt))
    if worst < 0:
      raise ValueError(f"dt has a negative entry ({worst:.4g}); expected step sizes "
                       "Δ ≥ 0 (apply softplus first)")
  if not isinstance(A, jax.core.Tracer):
    worst = float(jnp.max(A))
    if worst > 0:
      raise ValueError(f"A has a positive entry ({worst:.4g}); expected A ≤ 0 "
                       "(pass −exp(A_log))")


def selective_scan(x, dt, A, B, C, *, D=None, initial_state=None, segment_ids=None,
                   impl="auto", chunk_size=_CHUNK):
  """Mamba's S6 ``h_t = e^{Δ_t A} h_{t−1} + Δ_t B_t x_t``, ``y_t = C_t·h_t + D x_t``.

  Args:
    x: ``[B, T, D]`` inputs.
    dt: ``[B, T, D]`` step sizes Δ ≥ 0, already through softplus (and bias).
    A: ``[D, N]`` diagonal state matrix, entries ≤ 0.
    B: ``[B, T, N]`` input projection shared by all channels, or
      ``[B, T, G, N]`` per group of ``D/G`` contiguous channels.
    C: output projection, the shape of ``B``.
    D: ``[D]`` skip weights, or None.
    initial_state: ``[B, D, N]`` state before the first step; zeros if None.
    segment_ids: ``[B, T]`` integer document ids; the state resets where the
      id changes.
    impl: ``"recurrent" | "associative" | "chunked" | "auto"``.
    chunk_size: chunk length of ``impl="chunked"``.

  Returns:
    ``(y, state)``: ``y`` ``[B, T, D]`` in x's dtype; ``state`` ``[B, D, N]``
    float32, the state after position ``T−1``.
  """
  for name, a in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
    _checks.check_floating(name, a)
  if x.ndim != 3:
    raise ValueError(f"x has shape {_checks.shape_str(x.shape)}; expected [B, T, D]")
  batch, time, channels = x.shape
  _checks.check_shape("dt", dt, (batch, time, channels))
  if A.ndim != 2 or A.shape[0] != channels:
    raise ValueError(f"A has shape {_checks.shape_str(A.shape)}; expected "
                     f"[D, N] = {_checks.shape_str((channels, 'N'))}")
  state_dim = A.shape[1]
  grouped = B.ndim == 4
  if not (B.shape == (batch, time, state_dim) or (
      grouped and B.shape[:2] == (batch, time) and B.shape[3] == state_dim
      and channels % B.shape[2] == 0)):
    raise ValueError(
        f"B has shape {_checks.shape_str(B.shape)}; expected [B, T, N] = "
        f"{_checks.shape_str((batch, time, state_dim))} or [B, T, G, N] with G "
        f"dividing D = {channels}")
  _checks.check_shape("C", C, B.shape)
  if D is not None:
    _checks.check_floating("D", D)
    _checks.check_shape("D", D, (channels,))
  if initial_state is not None:
    _checks.check_shape("initial_state", initial_state, (batch, channels, state_dim))
  _checks.check_segment_ids(segment_ids, batch, time)
  _checks.check_positive_int("chunk_size", chunk_size)
  _check_signs(dt, A)
  groups = B.shape[2] if grouped else 1
  chosen = REGISTRY.resolve(impl, time=time, groups=groups, dtype=x.dtype,
                            chunk_size=chunk_size)

  out_dtype = x.dtype
  f32 = lambda a: a.astype(jnp.float32)
  width = channels // groups
  by_group = lambda a: f32(a).reshape(*a.shape[:-1], groups, width)
  grouped_state = lambda a: a.reshape(a.shape[0], groups, width, state_dim)
  B, C = (f32(a) if grouped else f32(a)[:, :, None] for a in (B, C))
  h0 = (jnp.zeros((batch, groups, width, state_dim), jnp.float32) if initial_state is None
        else grouped_state(f32(initial_state)))
  doc = (None if segment_ids is None
         else jnp.cumsum(_checks.segment_starts(segment_ids), axis=1, dtype=jnp.int32))

  y, state = chosen.fn(by_group(x), by_group(dt), f32(A).reshape(groups, width, state_dim),
                       B, C, h0, doc, chunk_size=chunk_size)
  y = y.reshape(batch, time, channels)
  if D is not None:
    y = y + f32(D) * f32(x)
  return y.astype(out_dtype), state.reshape(batch, channels, state_dim)
