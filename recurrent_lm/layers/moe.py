"""Mixture-of-experts MLP ``[B, T, D] → [B, T, D]`` and its routers.

Routing of every token ``x_t`` (E experts, top-k; float32 whatever the experts'
dtype, float64 for float64 logits)::

    ℓ_t   = router(x_t)                                  [E]  router logits
    p_t   = softmax(ℓ_t)                                 [E]
    S_t   = the k experts of largest ℓ_t                 (ties: lower index first)
    g_t,e = p_t,e / Σ_{e'∈S_t} p_t,e'   for e ∈ S_t,  0 otherwise   (renormalised top-k)
    y_t   = Σ_{e∈S_t} g_t,e · Expert_e(x_t)

Experts, stacked on a leading ``expert`` axis (no biases)::

    swiglu: Expert_e(x) = (SiLU(x W_gate[e]) ⊙ x W_up[e]) W_down[e]
            W_gate, W_up [E, D, F];  W_down [E, F, D]
    gelu:   Expert_e(x) = GELU_tanh(x W_in[e]) W_out[e]
            W_in [E, D, F];  W_out [E, F, D]

    logical axes: [E, D, F] ("expert", "embed", "mlp"); [E, F, D] ("expert", "mlp", "embed")

Routers (logits ``[B, T, E]`` float32):

* :class:`LinearRouter`: ``ℓ = x W``, ``W [D, E]`` per layer (Switch, Mixtral).
* :class:`RecurrentRouterStep`: RMoE's layerwise recurrent router (Qiu et al.
  2024, arXiv 2408.06793). In layer ``i`` of the stack::

      x'_i = x_i W1_i                W1_i [D, R]  per layer, no bias
      h_i  = GRU(x'_i, h_{i-1})      one GRU R → R shared by all layers, h_0 = 0
      ℓ_i  = h_i W2_i                W2_i [R, E]  per layer, no bias

  The recurrence runs over depth, not time: ``h_{i-1}`` is the router state of
  the same token at the previous layer, so every token is independent and
  the router needs no state across calls. The GRU is the standard
  (Cho et al. / PyTorch) cell, flax's :class:`nn.GRUCell`::

      r = σ(x' W_ir + b_ir + h W_hr)      z = σ(x' W_iz + b_iz + h W_hz)
      n = tanh(x' W_in + b_in + r ⊙ (h W_hn + b_hn))
      h' = (1 − z) ⊙ n + z ⊙ h

  (the reference's separate ``b_hr``, ``b_hz`` add to ``b_ir``, ``b_iz``: the
  same family of functions).

Sharing one GRU across a stack scanned with ``nn.scan(variable_axes={"params": 0})``:
a module passed into a scanned module is lifted with the same variable axes,
so its parameters would be stacked per layer. Instead the stack owns the GRU
parameters as ONE pytree parameter outside the scan and passes it in
broadcast; the per-layer ``W1_i``, ``W2_i`` live inside the scanned module and
are stacked on the ``layers`` axis, and the router state ``h`` travels in the
scan carry next to the residual stream::

    class Layer(nn.Module):
      @nn.compact
      def __call__(self, carry, gru_params):
        x, h = carry
        logits, h = RecurrentRouterStep(E, R, name="router")(x, h, gru_params)
        y, aux = MoEMLP(D, F, E, k, name="moe")(x, logits)
        return (x + y, h), aux

    class Stack(nn.Module):
      @nn.compact
      def __call__(self, x):
        gru_params = self.param("router_gru", gru_param_init(R))     # shared, not scanned
        h0 = initial_router_state(x.shape[0], x.shape[1], R)         # h_0 = 0
        scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=nn.broadcast, length=L)
        (x, h), aux = scan(name="layers")((x, h0), gru_params)       # aux stacked [L]

Dispatch (:class:`MoEMLP`):

* ``capacity_factor=None`` (dense, dropless, exact): every expert runs on every
  token, ``y = Σ_e g_e · Expert_e(x)`` as one einsum over E — E times the
  compute of one expert and a ``[B, T, E, F]`` hidden; the reference's function.
* ``capacity_factor=c``: capacity-limited dispatch with one-hot dispatch and
  combine tensors (GShard, Switch). Each row of the batch is one group; each
  expert takes at most ``C = min(T, ⌈c · k · T / E⌉)`` of the row's
  assignments. Priority is choice-major: every token's first choice in
  order of position, then every token's second choice, … (GShard); an
  assignment past its expert's C slots is dropped: it contributes 0 (the
  token keeps its other assignments, their gates not renormalised, and the
  residual connection carries it through when all are dropped). Drops are counted in ``dropped_fraction``.
  Costs ``O(B·T·k·E·C) = O(c·k²·B·T²)`` for the dispatch tensors, so it is
  meant for training at fixed T; results depend on which tokens share a row,
  so a sequence run in pieces or token by token can differ from one call —
  evaluate and decode with ``capacity_factor=None``.

Masked tokens (``mask`` 0, e.g. padding) get ``y = 0`` in both modes, take no
capacity, and are left out of every statistic. Over the N unmasked tokens::

    f_e = (1 / (k N)) Σ_t [e ∈ S_t]        share of the k·N assignments sent to e
    P_e = (1 / N) Σ_t p_t,e                mean router probability of e
    load_balance_loss = E · Σ_e f_e · P_e  (Switch; 1 when f and P are uniform)
    router_z_loss     = (1 / N) Σ_t logsumexp(ℓ_t)²     (ST-MoE)
    dropped_fraction  = dropped assignments / (k N)     (0 when dense)

The gradient reaches the router through ``g`` and ``P`` (``f`` and ``S`` are
piecewise constant).

Against the RMoE reference (github qiuzh20/RMoE, ``llama_moe_rnn``): the router
reads the MLP's normed input; ``W1``, ``W2`` have no bias; the GRU's input
and state are both R = 256 wide and it starts from zeros; the routing softmax
is float32 and the top-2 renormalised, as here. Its GRU runs in the model's
dtype, here in float32. Its Mixtral-style load-balance loss is one loss over
the logits of all layers pooled, with ``f_e`` counting assignments without
the ``1/k`` (so it is k at balance), times 1e-3.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from recurrent_lm.layers import _common

_ACTIVATIONS = ("swiglu", "gelu")


def _routing_dtype(router_logits):
  """float32, or float64 for float64 logits (gradient checks)."""
  return jnp.promote_types(router_logits.dtype, jnp.float32)


def route(router_logits, top_k: int):
  """The top-k routing of ``router_logits`` ``[..., E]``, in float32 (or wider).

  Returns:
    ``(probs, gates, top_idx)``: ``probs = softmax(ℓ)`` ``[..., E]``; ``gates``
    ``[..., E]``, the probabilities of the top-k experts renormalised to sum to 1
    and zeros elsewhere; ``top_idx`` ``[..., k]`` int32 in decreasing order of ℓ.
  """
  logits = router_logits.astype(_routing_dtype(router_logits))
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)
  _, top_idx = jax.lax.top_k(logits, top_k)
  selected = jax.nn.one_hot(top_idx, num_experts, dtype=probs.dtype).sum(axis=-2)
  kept = probs * selected
  gates = kept / jnp.sum(kept, axis=-1, keepdims=True)
  return probs, gates, top_idx


def capacity(time: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Slots per expert per row: ``C = min(T, ⌈capacity_factor · k · T / E⌉)``."""
  return min(time, math.ceil(capacity_factor * top_k * time / num_experts))


def routing_statistics(router_logits, probs, top_idx, mask, top_k: int) -> dict[str, Any]:
  """``load_balance_loss`` and ``router_z_loss`` over the unmasked tokens (module docstring).

  Args:
    router_logits, probs: ``[B, T, E]``.
    top_idx: ``[B, T, k]``.
    mask: ``[B, T]`` float32 (1 = counted).
    top_k: k.
  """
  num_experts = probs.shape[-1]
  mask = mask.astype(probs.dtype)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  selected = jax.nn.one_hot(top_idx, num_experts, dtype=probs.dtype).sum(axis=-2)
  f = jnp.einsum("bte,bt->e", selected, mask) / (top_k * count)
  p = jnp.einsum("bte,bt->e", probs, mask) / count
  z = jax.nn.logsumexp(router_logits.astype(probs.dtype), axis=-1)
  return {"load_balance_loss": num_experts * jnp.sum(f * p),
          "router_z_loss": jnp.sum(jnp.square(z) * mask) / count}


class _ExpertKernel(nn.Module):
  """One stacked expert kernel, ``kernel`` ``[E, fan_in, fan_out]`` (a leaf named
  ``kernel`` so the optimizer decays it like every other matrix)."""
  shape: tuple[int, int, int]
  axes: tuple[str, str, str]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    # batch_axis=0: each expert's fan-in is its own input width, not E times it.
    init = nn.initializers.lecun_normal(batch_axis=(0,))
    return self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape,
                      self.param_dtype)


class MoEMLP(nn.Module):
  """Top-k mixture of E MLP experts; ``x`` ``[B, T, D]`` (module docstring).

  Attributes:
    d_model: D.
    hidden_dim: F, the hidden width of every expert.
    num_experts: E.
    top_k: k experts per token, 1 ≤ k ≤ E.
    capacity_factor: None for the dense dropless dispatch; c > 0 for the
      capacity-limited one, ``C = min(T, ⌈c·k·T/E⌉)`` slots per expert per row.
    activation: ``swiglu`` or ``gelu`` (tanh GELU) experts.
    dtype: compute dtype of the experts (routing is float32).
    param_dtype: dtype of the expert kernels.
  """
  d_model: int
  hidden_dim: int
  num_experts: int = 8
  top_k: int = 2
  capacity_factor: float | None = None
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _check_config(self):
    for field in ("d_model", "hidden_dim", "num_experts", "top_k"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MoEMLP {field}={value!r}; expected a positive int")
    if self.top_k > self.num_experts:
      raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                       "expected top_k <= num_experts")
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      raise ValueError(f"capacity_factor={self.capacity_factor!r}; expected > 0 or None")
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}; expected one of "
                       f"{', '.join(_ACTIVATIONS)}")

  def _experts(self, x, spec_in: str, spec_out: str, hidden_weight=None):
    """``Expert_e`` on ``x``, the expert axis placed by the einsum specs; the
    hidden ``[..., F]`` is multiplied by ``hidden_weight`` ``[...]`` when given."""
    num_experts, d, f = self.num_experts, self.d_model, self.hidden_dim
    kernel = lambda name, shape, axes: _ExpertKernel(
        shape, axes, self.param_dtype, name=name)().astype(self.dtype)
    w_in = lambda name: kernel(name, (num_experts, d, f), ("expert", "embed", "mlp"))
    w_out = lambda name: kernel(name, (num_experts, f, d), ("expert", "mlp", "embed"))
    if self.activation == "swiglu":
      hidden = (jax.nn.silu(jnp.einsum(spec_in, x, w_in("gate_proj")))
                * jnp.einsum(spec_in, x, w_in("up_proj")))
      down = w_out("down_proj")
    else:
      hidden = jax.nn.gelu(jnp.einsum(spec_in, x, w_in("fc_in")), approximate=True)
      down = w_out("fc_out")
    if hidden_weight is not None:
      hidden = hidden * hidden_weight[..., None]
    return jnp.einsum(spec_out, hidden, down)

  @nn.compact
  def __call__(self, x, router_logits, mask=None):
    """Mixes ``x`` through the experts that ``router_logits`` choose.

    Args:
      x: ``[B, T, D]`` floating.
      router_logits: ``[B, T, E]`` from a router.
      mask: ``[B, T]`` (bool or 0/1) tokens that count; None counts all.

    Returns:
      ``(y, aux)``: ``y`` ``[B, T, D]`` in ``dtype``; ``aux`` float32 scalars
      ``load_balance_loss``, ``router_z_loss`` and ``dropped_fraction``.
    """
    self._check_config()
    _common.check_input(x, self.d_model)
    batch, time = x.shape[:2]
    expected = (batch, time, self.num_experts)
    if router_logits.shape != expected:
      raise ValueError(f"router_logits have shape {_common.shape_str(router_logits.shape)}; "
                       f"expected {_common.shape_str(expected)}")
    if mask is None:
      mask = jnp.ones((batch, time), jnp.float32)
    elif mask.shape != (batch, time):
      raise ValueError(f"mask has shape {_common.shape_str(mask.shape)}; "
                       f"expected {_common.shape_str((batch, time))}")
    mask = mask.astype(jnp.float32)

    probs, gates, top_idx = route(router_logits, self.top_k)
    aux = routing_statistics(router_logits, probs, top_idx, mask, self.top_k)
    gates = gates * mask[..., None]
    x = x.astype(self.dtype)

    if self.capacity_factor is None:
      y = self._dense(x, gates)
      aux["dropped_fraction"] = jnp.zeros((), probs.dtype)
    else:
      y, dropped = self._capacity_limited(x, gates, top_idx, mask)
      aux["dropped_fraction"] = (dropped / (self.top_k * jnp.maximum(jnp.sum(mask), 1.0))
                                 ).astype(probs.dtype)
    return y, aux

  def _dense(self, x, gates):
    """Every expert on every token, weighted by the gates (zero off the top-k);
    weighting the hidden before the down projection sums over E in one einsum."""
    return self._experts(x, "btd,edf->btef", "btef,efd->btd", gates.astype(self.dtype))

  def _capacity_limited(self, x, gates, top_idx, mask):
    """GShard/Switch one-hot dispatch with C slots per expert per row.

    Returns ``(y, dropped)``, ``dropped`` the number of unmasked assignments
    that found their expert full.
    """
    batch, time = x.shape[:2]
    k, num_experts = self.top_k, self.num_experts
    slots = capacity(time, num_experts, k, self.capacity_factor)
    # [B, T, k, E] one-hot choices of the unmasked tokens, put in priority
    # order (choice-major: all first choices, then all second choices, ...).
    choice = jax.nn.one_hot(top_idx, num_experts, dtype=jnp.int32) * (
        mask[:, :, None, None] > 0).astype(jnp.int32)
    ordered = jnp.swapaxes(choice, 1, 2).reshape(batch, k * time, num_experts)
    position = jnp.cumsum(ordered, axis=1) - 1          # slot index within the expert
    kept = (ordered > 0) & (position < slots)
    dropped = jnp.sum(ordered) - jnp.sum(kept)
    # One-hot slot of each kept assignment (index `slots` → all zeros), summed
    # over the k choices: a token meets each expert at most once.
    slot = jax.nn.one_hot(jnp.where(kept, position, slots), slots, dtype=self.dtype)
    dispatch = jnp.swapaxes(slot.reshape(batch, k, time, num_experts, slots), 1, 2).sum(2)
    combine = dispatch * gates.astype(self.dtype)[..., None]            # [B, T, E, C]
    expert_in = jnp.einsum("btec,btd->becd", dispatch, x)               # [B, E, C, D]
    expert_out = self._experts(expert_in, "becd,edf->becf", "becf,efd->becd")
    y = jnp.einsum("btec,becd->btd", combine, expert_out)
    return y, dropped.astype(jnp.float32)


class LinearRouter(nn.Module):
  """The plain per-layer router ``ℓ = x W``, ``W [D, E]`` (no bias); float32 logits.

  Attributes:
    num_experts: E.
    dtype: compute dtype; keep float32 (routing decisions are precision-sensitive).
    param_dtype: dtype of ``W``.
  """
  num_experts: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """``x`` ``[B, T, D]`` → logits ``[B, T, E]`` float32."""
    if x.ndim != 3:
      raise ValueError(f"x has shape {_common.shape_str(x.shape)}; expected [B, T, D]")
    logits = _common.dense(self.num_experts, ("embed", None), name="gate", dtype=self.dtype,
                           param_dtype=self.param_dtype)(x.astype(self.dtype))
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def _gru_cell(router_dim: int, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.GRUCell:
  # parent=None: an unbound cell, used functionally on the shared parameters.
  return nn.GRUCell(router_dim, dtype=dtype, param_dtype=param_dtype, parent=None)


def gru_param_init(router_dim: int, param_dtype=jnp.float32):
  """The initialiser of the shared GRU's parameters, one pytree for ``Module.param``::

      gru_params = self.param("router_gru", gru_param_init(256))

  The tree is ``nn.GRUCell(router_dim)``'s ``params`` (``ir, iz, in`` kernels
  ``[R, R]`` and biases, ``hr, hz, hn`` kernels, ``hn`` bias); its leaves carry
  no logical axes, so they are replicated.
  """
  if not isinstance(router_dim, int) or isinstance(router_dim, bool) or router_dim < 1:
    raise ValueError(f"router_dim={router_dim!r}; expected a positive int")

  def init(key):
    zeros = jnp.zeros((1, router_dim), param_dtype)
    return _gru_cell(router_dim, param_dtype=param_dtype).init(key, zeros, zeros)["params"]
  return init


def initial_router_state(batch_size: int, time: int, router_dim: int, dtype=jnp.float32):
  """``h_0 = 0`` ``[B, T, R]``: the router state before the first layer."""
  return jnp.zeros((batch_size, time, router_dim), dtype)


class RecurrentRouterStep(nn.Module):
  """One layer of RMoE's recurrent router: ``ℓ_i, h_i`` from ``x_i, h_{i−1}``.

  Owns this layer's ``router_in`` (``W1_i`` ``[D, R]``) and ``router_out``
  (``W2_i`` ``[R, E]``); the GRU parameters are shared by every layer and
  passed in (module docstring for the ``nn.scan`` pattern).

  Attributes:
    num_experts: E.
    router_dim: R (256 in RMoE).
    dtype: compute dtype of the router and its state; keep float32.
    param_dtype: dtype of ``W1_i``, ``W2_i``.
  """
  num_experts: int
  router_dim: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, h_prev, gru_params):
    """Args:
      x: ``[B, T, D]``, this layer's MLP input.
      h_prev: ``[B, T, R]`` router state of the previous layer; None (or
        :func:`initial_router_state`) at the first layer.
      gru_params: the shared GRU's parameters (:func:`gru_param_init`).

    Returns:
      ``(logits, h)``: ``[B, T, E]`` float32 and the state ``[B, T, R]`` in ``dtype``.
    """
    if x.ndim != 3:
      raise ValueError(f"x has shape {_common.shape_str(x.shape)}; expected [B, T, D]")
    state_shape = x.shape[:2] + (self.router_dim,)
    if h_prev is None:
      h_prev = jnp.zeros(state_shape, self.dtype)
    elif h_prev.shape != state_shape:
      raise ValueError(f"h_prev has shape {_common.shape_str(h_prev.shape)}; "
                       f"expected {_common.shape_str(state_shape)}")
    proj = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x_r = _common.dense(self.router_dim, ("embed", None), name="router_in", **proj)(
        x.astype(self.dtype))
    h, _ = _gru_cell(self.router_dim, self.dtype, self.param_dtype).apply(
        {"params": gru_params}, h_prev.astype(self.dtype), x_r)
    logits = _common.dense(self.num_experts, (None, None), name="router_out", **proj)(h)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32)), h
