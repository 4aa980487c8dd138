"""Neural long-term memory (Titans) and its Miras variants, trained chunk-parallel.

Per head, a memory ``M_W`` with weights ``W`` (a matrix, or a 2-layer MLP)
learns at test time to map keys to values. Token t takes one step on its
*attentional bias* ``ℓ(W; k_t, v_t)`` and reads with its query::

    g_t = clip_c(∇_W ℓ(G_t; k_t, v_t))      the gradient, taken at the memory G_t
    S_t = η_t S_{t−1} − θ_t g_t              surprise with momentum (Titans);
                                             without momentum S_t = −θ_t g_t
    A_t = r_t A_{t−1} + S_t                  retention r_t = 1 − α_t ∈ (0, 1]
    W_t = φ(A_t)                             the retention's map (below)
    y_t = M_{W_t}(q_t)                       read after the update

``clip_c(g) = g · min(1, c / ‖g‖)`` (the norm over all of the token's
weights) bounds every step, so the memory stays finite on any input: without
it, gradient steps on an MLP memory can grow the weights, and with them the
next gradients, without bound. ``c = None`` turns it off.

Memories: ``linear`` ``M(x) = x W`` (W ``[K, V]``); ``mlp``
``M(x) = x + gelu(x W1) W2`` (W1 ``[K, F]``, W2 ``[F, V]``, K = V).

Attentional biases (``e = M(k) − v``): ``l2`` ``Σ e²`` (Titans, Memora);
``lp`` ``Σ |e|^p`` (Moneta, p = 3); ``huber`` ``Σ huber_δ(e)`` elementwise,
``e²/2`` inside ``|e| ≤ δ_t`` and ``δ_t(|e| − δ_t/2)`` outside (Yaad: an ℓ2
step inside, an ℓ1 step outside; δ_t data-dependent).

Retention maps φ (applied to every weight matrix of the memory separately):
``decay`` the identity (Titans' forgetting, Yaad); ``lq``
``A / ‖A‖_q^{q−2}`` (Moneta's ℓq normalisation, q = 4); ``kl``
``softmax`` over the last axis (Memora: ``W_t = softmax(r_t log W_{t−1} −
θ_t g_t)`` — softmax ignores constants along its axis, so the logits follow
the same linear recurrence ``A_t = r_t A_{t−1} − θ_t g_t`` and ``W_t = softmax(A_t)``).

**Chunks.** The gradient memory ``G_t`` is the memory at the start of t's
chunk: chunks are C consecutive tokens of a document (positions
``[jC, (j+1)C)`` within it), ``G_t = W_{s−1}`` for the chunk starting at s, and
``W_{−1} = φ(A_0)`` with ``A_0`` the learned initial memory at every document
start. Inside a chunk the gradients are then independent, and ``(S, A)``
follows an affine recurrence in the scalars ``η, r`` — an associative scan.
``C = 1`` is the plain recurrent form (every gradient at the previous memory).
The chunk grid belongs to the document, not to the call, so a sequence run in
pieces, token by token, or packed with others gives the same result: each
call walks the row in blocks of C; a block holds the tail of one chunk of the
running document and the head of the next (split at a point p), and any
documents that start inside it (whose gradients are at ``φ(A_0)``). The
gradients known at the block's start give ``A_{p−1}``, and so the memory of
the second part's gradients.

**Factors.** A token's gradient is rank one per weight matrix (``k ⊗ ψ`` for
the matrix; ``k ⊗ δ1`` and ``h ⊗ ψ`` for the MLP, ``ψ = ∂ℓ/∂e``), so in a
block ``A_t = a_t A_in + b_t S_in + c_t A_0 + Σ_s w_ts left_s ⊗ right_s`` with
scalar weights from the affine scan of ``(η, r)`` alone. With the identity φ
(``decay``) a read ``x A_t`` is ``a_t x A_in + … + ((x leftᵀ) ⊙ w) right``, an
attention-like product, and no per-token memory is ever built (the dual form
of chunked test-time training); ℓq and KL build ``A_t`` per token to apply φ,
at L times the memory's size per block.

State ``{memory A, momentum S (when used), grad_memory G, position}``:
leaves ``[B, H, ...]`` float32 plus the ``[B]`` position of the next token in
its document — three (two without momentum) copies of the memory, fixed size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from recurrent_lm.ops import _checks

MEMORIES = ("linear", "mlp")
OBJECTIVES = ("l2", "lp", "huber")
RETENTIONS = ("decay", "lq", "kl")

Memory = dict[str, jax.Array]


def memory_apply(weights: Memory, x):
  """``M_W(x)`` for one head: ``x`` ``[..., K]`` → ``[..., V]``."""
  if "w" in weights:
    return x @ weights["w"]
  return x + jax.nn.gelu(x @ weights["w1"]) @ weights["w2"]


def retention_map(accumulator: Memory, retention: str, q: float = 4.0) -> Memory:
  """φ: the memory's weights from its accumulator, matrix by matrix (leaves ``[..., m, n]``)."""
  if retention == "decay":
    return accumulator
  if retention == "kl":
    return jax.tree_util.tree_map(lambda a: jax.nn.softmax(a, axis=-1), accumulator)

  def normalise(a):
    norm = jnp.sum(jnp.abs(a) ** q, axis=(-2, -1), keepdims=True) ** (1.0 / q)
    return a / jnp.maximum(norm, 1e-6) ** (q - 2.0)
  return jax.tree_util.tree_map(normalise, accumulator)


def attentional_bias(weights: Memory, k, v, delta, objective: str, p: float = 3.0):
  """``ℓ(W; k, v)`` for one token of one head (``k`` ``[K]``, ``v`` ``[V]``, ``delta`` scalar)."""
  e = memory_apply(weights, k) - v
  if objective == "l2":
    return jnp.sum(e * e)
  if objective == "lp":
    return jnp.sum(jnp.abs(e) ** p)
  a = jnp.abs(e)
  return jnp.sum(jnp.where(a <= delta, 0.5 * e * e, delta * (a - 0.5 * delta)))


def init_state(batch_size: int, init_memory_shapes: Memory, *, momentum: bool) -> dict[str, Any]:
  """A fresh state: zeros (the first token of a document loads the learned memory).

  Args:
    batch_size: B.
    init_memory_shapes: ``{name: (H, m, n)}`` shapes of the initial memory.
    momentum: whether the state carries the surprise S.
  """
  zeros = {name: jnp.zeros((batch_size,) + tuple(shape), jnp.float32)
           for name, shape in init_memory_shapes.items()}
  state = {"memory": zeros, "grad_memory": dict(zeros),
           "position": jnp.zeros((batch_size,), jnp.int32)}
  if momentum:
    state["momentum"] = dict(zeros)
  return state


def neural_memory(q, k, v, lr, retain, momentum=None, delta=None, *, init_memory: Memory,
                  objective: str = "l2", p: float = 3.0, retention: str = "decay",
                  q_norm: float = 4.0, max_grad_norm: float | None = None,
                  chunk_size: int = 16, initial_state=None, segment_ids=None):
  """Runs the memory over a sequence (module docstring for the equations).

  Args:
    q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
    lr: θ ``[B, T, H]`` ≥ 0, the step size.
    retain: r ``[B, T, H]`` in (0, 1], the retention (1 − α).
    momentum: η ``[B, T, H]`` in [0, 1), or None for plain gradient steps.
    delta: Huber's δ ``[B, T, H]`` > 0 (``objective == "huber"`` only).
    init_memory: ``A_0``, leaves ``[H, m, n]`` (``{"w"}`` linear or ``{"w1", "w2"}`` MLP).
    objective, p: the attentional bias and ℓp's exponent.
    retention, q_norm: the retention map φ and ℓq's exponent.
    max_grad_norm: c, the largest norm of one token's gradient; None: no clipping.
    chunk_size: C; 1 is the recurrent form.
    initial_state: from :func:`init_state` or a previous call; None starts every row.
    segment_ids: ``[B, T]`` document ids of packed rows.

  Returns:
    ``(y, state)``: ``y`` ``[B, T, H, V]`` float32 (float64 for float64 inputs)
    and the state after the last token.
  """
  batch, time, heads, dk, dv = _checks.check_qkv(q, k, v)
  _checks.check_positive_int("chunk_size", chunk_size)
  _checks.check_segment_ids(segment_ids, batch, time)
  for name, value, allowed in (("objective", objective, OBJECTIVES),
                               ("retention", retention, RETENTIONS)):
    if value not in allowed:
      raise ValueError(f"{name}={value!r}; expected one of {', '.join(allowed)}")
  gates = {"lr": lr, "retain": retain}
  if momentum is not None:
    gates["momentum"] = momentum
  if objective == "huber":
    if delta is None:
      raise ValueError("objective='huber' needs delta [B, T, H]; got None")
    gates["delta"] = delta
  for name, gate in gates.items():
    _checks.check_shape(name, gate, (batch, time, heads))
  use_momentum = momentum is not None
  shapes = {name: w.shape for name, w in init_memory.items()}
  if initial_state is None:
    initial_state = init_state(batch, shapes, momentum=use_momentum)
  initial_state = dict(initial_state, **{
      name: jax.tree_util.tree_map(lambda a: a.astype(jnp.promote_types(q.dtype, jnp.float32)),
                                   initial_state[name])
      for name in ("memory", "momentum", "grad_memory") if name in initial_state})

  acc_dtype = jnp.promote_types(q.dtype, jnp.float32)   # float32, or float64 under x64
  f32 = lambda a: a.astype(acc_dtype)
  a0 = jax.tree_util.tree_map(f32, init_memory)            # [H, m, n]
  w0 = retention_map(a0, retention, q_norm)
  # Blocks of ≤ C tokens hold at most one chunk start of the running document;
  # a short call (decoding) is one block of its own length.
  chunk = min(chunk_size, time)
  padded = -(-time // chunk) * chunk
  pad = padded - time

  positions = _checks.document_positions(initial_state["position"], segment_ids, time)
  real = jnp.arange(padded) < time
  positions = jnp.pad(positions, ((0, 0), (0, pad)))
  reset = (positions == 0) & real
  refresh = (positions % chunk_size == 0) & real

  def to_chunks(a, fill=0.0):   # [B, T, H, ...] → [N, B, H, C, ...]
    a = jnp.pad(f32(a), ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2), constant_values=fill)
    a = a.reshape((batch, padded // chunk, chunk) + a.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(a, 1, 0), 3, 2)

  def flags_to_chunks(a):       # [B, T_pad] → [N, B, C]
    return jnp.moveaxis(a.reshape(batch, padded // chunk, chunk), 1, 0)

  xs = {"q": to_chunks(q), "k": to_chunks(k), "v": to_chunks(v),
        "lr": to_chunks(lr), "retain": to_chunks(retain, 1.0),
        "reset": flags_to_chunks(reset), "refresh": flags_to_chunks(refresh),
        "real": flags_to_chunks(jnp.broadcast_to(real, (batch, padded)))}
  if use_momentum:
    xs["momentum"] = to_chunks(momentum)
  if objective == "huber":
    xs["delta"] = to_chunks(delta, 1.0)

  read = jax.vmap(jax.vmap(jax.vmap(memory_apply)))        # per-token weights, [B, H, L]

  def bcast(a, like):           # [B, H, ...] → broadcastable against ``like``
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))

  # ---- one block, in factors ------------------------------------------------
  # Every token's gradient is rank one per weight matrix (``k ⊗ δ1`` and
  # ``h ⊗ ψ`` for the MLP, ``k ⊗ ψ`` for the matrix), so ``A_t`` is the block's
  # incoming (S, A), A_0, and a weighted sum of those outer products, with
  # weights from the affine scan run on scalars. With φ the identity (decay)
  # the reads ``x A_t`` are attention-like ``(x Lᵀ ⊙ coefficients) R``
  # products and no per-token memory is built (the dual form); ℓq's and KL's
  # φ are not linear, so those build ``A_t`` per token (one einsum) to read.
  def bias_grad(e, d):          # ∂ℓ/∂e, elementwise
    if objective == "l2":
      return 2.0 * e
    if objective == "lp":
      return p * jnp.abs(e) ** (p - 1.0) * jnp.sign(e)
    return jnp.clip(e, -d[..., None], d[..., None])

  def grad_factors(w, c, d):
    """``{matrix: (left [B, H, L, m], right [B, H, L, n])}``: token t's update
    ``u_t = −θ_t clip(∇ℓ(w; k_t, v_t))`` as ``left_t ⊗ right_t`` per matrix."""
    k_, v_ = c["k"], c["v"]
    if "w" in w:
      psi = bias_grad(jnp.einsum("bhck,bhkv->bhcv", k_, w["w"]) - v_, d)
      factors = {"w": (k_, psi)}
    else:
      z = jnp.einsum("bhck,bhkf->bhcf", k_, w["w1"])
      h, gelu_vjp = jax.vjp(jax.nn.gelu, z)
      psi = bias_grad(k_ + jnp.einsum("bhcf,bhfv->bhcv", h, w["w2"]) - v_, d)
      delta1 = gelu_vjp(jnp.einsum("bhcv,bhfv->bhcf", psi, w["w2"]))[0]
      factors = {"w1": (k_, delta1), "w2": (h, psi)}
    scale = -c["lr"]
    if max_grad_norm is not None:
      sq = sum(jnp.sum(l * l, -1) * jnp.sum(r * r, -1) for l, r in factors.values())
      scale = scale * jnp.minimum(1.0, max_grad_norm / jnp.sqrt(jnp.maximum(sq, 1e-30)))
    return {n: (l, r * scale[..., None]) for n, (l, r) in factors.items()}

  def coefficients(c):
    """The block's affine scan on scalars, in the basis ``(u_0 … u_{L−1}, A_0)``.

    Returns ``(s, sa, aa, bs, ba)``: ``S_t = s_t S_in + bs_t · (u, A_0)`` and
    ``A_t = sa_t S_in + aa_t A_in + ba_t · (u, A_0)``; ``s, sa, aa`` ``[B, H, L]``,
    ``bs, ba`` ``[B, H, L, L + 1]``.
    """
    length = c["lr"].shape[-1]
    reset_, real = c["reset"], c["real"][:, None, :]
    keep = jnp.where(reset_, 0.0, 1.0)
    a_ss = jnp.where(real, c["eta"] * keep, 1.0)
    a_as = jnp.where(real, c["eta"] * keep, 0.0)
    a_aa = jnp.where(real, c["retain"] * keep, 1.0)
    eye = jnp.eye(length, length + 1, dtype=acc_dtype)
    b_s = jnp.broadcast_to(jnp.where(real[..., None], eye, 0.0), reset_.shape + (length + 1,))
    b_a = b_s + (jnp.where(reset_ & real, c["retain"], 0.0)[..., None]
                 * jax.nn.one_hot(length, length + 1, dtype=acc_dtype))

    def combine(first, second):
      s1, sa1, aa1, bs1, ba1 = first
      s2, sa2, aa2, bs2, ba2 = second
      return (s2 * s1, sa2 * s1 + aa2 * sa1, aa2 * aa1, s2[..., None] * bs1 + bs2,
              sa2[..., None] * bs1 + aa2[..., None] * ba1 + ba2)

    return jax.lax.associative_scan(combine, (a_ss, a_as, a_aa, b_s, b_a), axis=2)

  def read_dual(x, coef, factors, acc, mom):
    """``M_{A_t}(x_t)`` for every token of the block, ``x`` ``[B, H, L, K]``."""
    _, sa, aa, _, ba = coef
    length = x.shape[2]
    cu, c0 = ba[..., :length], ba[..., length]

    def times(name, x_):          # x_t A_t for one matrix
      left, right = factors[name]
      base = (aa[..., None] * jnp.einsum("bhcm,bhmn->bhcn", x_, acc[name])
              + sa[..., None] * jnp.einsum("bhcm,bhmn->bhcn", x_, mom[name])
              + c0[..., None] * jnp.einsum("bhcm,hmn->bhcn", x_, a0[name]))
      scores = jnp.einsum("bhtm,bhsm->bhts", x_, left) * cu
      return base + jnp.einsum("bhts,bhsn->bhtn", scores, right)

    if "w" in factors:
      return times("w", x)
    return x + times("w2", jax.nn.gelu(times("w1", x)))

  def materialize(coef, factors, acc, mom, j):
    """``(A_j, S_j)`` of the block, ``j`` ``[B]`` int in ``[0, L)``."""
    s_, sa, aa, bs, ba = coef
    length = s_.shape[-1]
    row = lambda a: jnp.take_along_axis(a, j.reshape((batch, 1, 1) + (1,) * (a.ndim - 3)),
                                        axis=2)[:, :, 0]
    s_j, sa_j, aa_j, bs_j, ba_j = row(s_), row(sa), row(aa), row(bs), row(ba)
    outer = lambda w, n: jnp.einsum("bhs,bhsm,bhsn->bhmn", w[..., :length], *factors[n])
    a_j = {n: (aa_j[..., None, None] * acc[n] + sa_j[..., None, None] * mom[n]
               + ba_j[..., length, None, None] * a0[n][None] + outer(ba_j, n)) for n in acc}
    s_j = {n: s_j[..., None, None] * mom[n] + outer(bs_j, n) for n in acc}
    return a_j, s_j

  def every_memory(coef, factors, acc, mom):
    """``A_t`` of every token of the block: leaves ``[B, H, L, m, n]``."""
    _, sa, aa, _, ba = coef
    length = sa.shape[-1]
    return {n: (aa[..., None, None] * acc[n][:, :, None] + sa[..., None, None] * mom[n][:, :, None]
                + ba[..., length, None, None] * a0[n][None, :, None]
                + jnp.einsum("bhts,bhsm,bhsn->bhtmn", ba[..., :length], *factors[n]))
            for n in acc}

  def block(carry, c):
    acc, mom, grad_mem = carry
    if not use_momentum:
      mom = jax.tree_util.tree_map(jnp.zeros_like, acc)
    eta = c["momentum"] if use_momentum else jnp.zeros_like(c["lr"])
    c = dict(c, eta=eta, reset=c["reset"][:, None, :].repeat(heads, 1))
    d = c.get("delta", jnp.ones_like(c["lr"]))
    # Epochs: 0 = the running chunk (gradients at G from the carry); 1 = the
    # running document's next chunk (from its start p on); 2 = documents that
    # start in this block (gradients at φ(A_0)).
    reset_ = c["reset"][:, 0]                                   # [B, C]
    started = jnp.cumsum(reset_, axis=1) > 0
    split = c["refresh"] & ~started
    second = (jnp.cumsum(split, axis=1) > 0) & ~started
    epoch = jnp.where(started, 2, jnp.where(second, 1, 0))      # [B, C]
    p_idx = jnp.argmax(split, axis=1)                           # 0 when no split

    w0_b = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (batch,) + w.shape), w0)
    last = epoch[:, -1]

    def next_grad_memory(mid_mem):
      return jax.tree_util.tree_map(
          lambda g_c, g_m, g_0: jnp.where(bcast((last == 2)[:, None], g_c), g_0,
                                          jnp.where(bcast((last == 1)[:, None], g_c), g_m, g_c)),
          grad_mem, mid_mem, w0_b)

    ep = epoch[:, None, :, None]

    def pick_factors(f0, f1, f2):
      return jax.tree_util.tree_map(
          lambda x0, x1, x2: jnp.where(ep == 2, x2, jnp.where(ep == 1, x1, x0)), f0, f1, f2)

    coef = coefficients(c)
    f_carry = grad_factors(grad_mem, c, d)
    f_init = grad_factors(w0_b, c, d)
    # A_{p−1} needs only tokens before p (their coefficients vanish after it).
    before, _ = materialize(coef, pick_factors(f_carry, f_carry, f_init), acc, mom,
                            jnp.maximum(p_idx - 1, 0))
    before = jax.tree_util.tree_map(
        lambda a_b, a_in: jnp.where(bcast((p_idx == 0)[:, None], a_in), a_in, a_b), before, acc)
    mid_mem = retention_map(before, retention, q_norm)
    factors = pick_factors(f_carry, grad_factors(mid_mem, c, d), f_init)
    if retention == "decay":
      y = read_dual(c["q"], coef, factors, acc, mom)
    else:   # φ is not linear: build every token's memory, then read it
      y = read(retention_map(every_memory(coef, factors, acc, mom), retention, q_norm), c["q"])
    a_end, s_end = materialize(coef, factors, acc, mom,
                               jnp.full((batch,), c["lr"].shape[-1] - 1, jnp.int32))
    return (a_end, s_end if use_momentum else carry[1], next_grad_memory(mid_mem)), y

  carry = (initial_state["memory"], initial_state.get("momentum"), initial_state["grad_memory"])
  (acc, mom, grad_mem), y = jax.lax.scan(jax.checkpoint(block), carry, xs)
  y = jnp.moveaxis(y, 0, 2).reshape(batch, heads, padded, dv)[:, :, :time]
  state = {"memory": acc, "grad_memory": grad_mem, "position": positions[:, time - 1] + 1}
  if use_momentum:
    state["momentum"] = mom
  return jnp.swapaxes(y, 1, 2), state
