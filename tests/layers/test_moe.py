"""The mixture-of-experts MLP and its routers against numpy loops and formulas.

Tolerances: float32 against float64 numpy to 1e-5 of the output's largest
magnitude; gradients against central differences in float64 to 1e-6;
bfloat16 compute (float32 parameters, the same float32 router logits) within
2e-2 of float32 (bfloat16 keeps 8 bits of mantissa, ε ≈ 4e-3).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm.layers import moe
from recurrent_lm.training import sharding
from tests.layers._util import assert_close, params_of, sigmoid, silu, to_numpy

D, F, E, K = 8, 12, 4, 2
B, T = 2, 7


def _inputs(seed=0, batch=B, time=T, num_experts=E):
  kx, kl = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (batch, time, D))
  logits = 2.0 * jax.random.normal(kl, (batch, time, num_experts))
  return x, logits


# ---- numpy references -------------------------------------------------------

def np_softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def np_route(logits, k):
  """(probs, top indices in decreasing order, renormalised gates of those) per token."""
  probs = np_softmax(np.asarray(logits, np.float64))
  idx = np.argsort(-np.asarray(logits, np.float64), axis=-1, kind="stable")[..., :k]
  top = np.take_along_axis(probs, idx, -1)
  return probs, idx, top / top.sum(-1, keepdims=True)


def np_expert(p, e, x, activation):
  if activation == "swiglu":
    return (silu(x @ p["gate_proj"]["kernel"][e]) * (x @ p["up_proj"]["kernel"][e])
            ) @ p["down_proj"]["kernel"][e]
  pre = x @ p["fc_in"]["kernel"][e]
  gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
  return gelu @ p["fc_out"]["kernel"][e]


def np_moe(p, x, logits, k, activation="swiglu", slots=None, mask=None):
  """Token by token; with ``slots``, assignments claim expert slots per row in
  choice-major order (all first choices by position, then all second ...).

  Returns ``(y, dropped)``: the output and the set of dropped ``(b, t, j)``.
  """
  x = np.asarray(x, np.float64)
  batch, time = x.shape[:2]
  mask = np.ones((batch, time)) if mask is None else np.asarray(mask)
  _, idx, gates = np_route(logits, k)
  y, dropped = np.zeros_like(x), set()
  for b in range(batch):
    used = np.zeros(logits.shape[-1], int)
    for j in range(k):
      for t in range(time):
        if not mask[b, t]:
          continue
        e = idx[b, t, j]
        if slots is not None:
          if used[e] >= slots:
            dropped.add((b, t, j))
            continue
          used[e] += 1
        y[b, t] += gates[b, t, j] * np_expert(p, e, x[b, t], activation)
  return y, dropped


def np_load_balance(logits, k, mask=None):
  probs, idx, _ = np_route(logits, k)
  num_experts = probs.shape[-1]
  mask = np.ones(probs.shape[:-1]) if mask is None else np.asarray(mask, np.float64)
  n = mask.sum()
  counts = np.zeros(num_experts)
  for e in range(num_experts):
    counts[e] = ((idx == e).any(-1) * mask).sum()
  f = counts / (k * n)
  pbar = (probs * mask[..., None]).sum((0, 1)) / n
  return num_experts * np.sum(f * pbar)


def np_gru(p, h, x):
  """The standard GRU (RMoE's CustomGRUCell; biases b_hr, b_hz folded into b_ir, b_iz)."""
  lin = lambda name, v: v @ p[name]["kernel"] + (p[name]["bias"] if "bias" in p[name] else 0)
  r = sigmoid(lin("ir", x) + lin("hr", h))
  z = sigmoid(lin("iz", x) + lin("hz", h))
  n = np.tanh(lin("in", x) + r * lin("hn", h))
  return (1 - z) * n + z * h


def _params(model, *inputs, seed=0):
  """Random parameters of ``model``'s shapes, drawn by numpy (N(0, 1/fan_in) for
  matrices, N(0, 0.01) for vectors): ``model.init`` compiles its initialisers,
  seconds per model on CPU, which these tests do not need."""
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs))
  rng = np.random.default_rng(seed)
  def draw(leaf):
    scale = 1 / np.sqrt(leaf.shape[-2]) if len(leaf.shape) >= 2 else 0.1
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)
  return jax.tree_util.tree_map(draw, shapes)


def _run(model):
  """``model.apply`` compiled: one small program instead of op-by-op dispatch."""
  return jax.jit(model.apply)


def _moe(**kw):
  kw = dict(dict(num_experts=E, top_k=K), **kw)
  return moe.MoEMLP(D, F, **kw)


# ---- (1) dense dispatch ------------------------------------------------------

@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dense_moe_is_the_gated_sum_over_the_renormalised_top_k(activation):
  x, logits = _inputs()
  model = _moe(activation=activation)
  params = _params(model, x, logits)
  y, aux = _run(model)(params, x, logits)
  expected, _ = np_moe(to_numpy(params), x, np.asarray(logits), K, activation)
  assert_close(y, expected, 1e-5)
  assert float(aux["dropped_fraction"]) == 0.0
  kernels = {k: v["kernel"].shape for k, v in params["params"].items()}
  names = ("gate_proj", "up_proj", "down_proj") if activation == "swiglu" else ("fc_in", "fc_out")
  assert set(kernels) == set(names)
  assert kernels[names[-1]] == (E, F, D) and kernels[names[0]] == (E, D, F)


def test_expert_kernels_carry_expert_embed_mlp_axes_and_per_expert_fan_in():
  x, logits = _inputs()
  boxed = jax.eval_shape(_moe().init, jax.random.key(0), x, logits)
  specs = nn.get_partition_spec(boxed)["params"]
  assert tuple(specs["gate_proj"]["kernel"]) == ("expert", "embed", "mlp")
  assert tuple(specs["down_proj"]["kernel"]) == ("expert", "mlp", "embed")
  expert_kernel = moe._ExpertKernel((16, 64, 64), ("expert", "embed", "mlp"))
  kernel = np.asarray(params_of(expert_kernel)["params"]["kernel"])
  assert 0.8 < kernel.std() * np.sqrt(64) < 1.2   # lecun: var 1/fan_in, fan_in = D, not E·D


# ---- (2) capacity-limited dispatch -----------------------------------------

def test_capacity_dispatch_with_a_slot_for_every_token_equals_dense():
  x, logits = _inputs()
  dense = _moe()
  params = _params(dense, x, logits)
  y_dense, _ = _run(dense)(params, x, logits)
  y_cap, aux = _run(_moe(capacity_factor=100.0))(params, x, logits)
  assert moe.capacity(T, E, K, 100.0) == T
  assert_close(y_cap, y_dense, 1e-6)
  assert float(aux["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("capacity_factor", [0.5, 0.75])
def test_capacity_drops_exactly_the_assignments_past_capacity_in_priority_order(
    capacity_factor):
  x, logits = _inputs(seed=3, time=9)
  model = _moe(capacity_factor=capacity_factor)
  params = _params(model, x, logits)
  y, aux = _run(model)(params, x, logits)
  slots = moe.capacity(9, E, K, capacity_factor)
  assert slots == int(np.ceil(capacity_factor * K * 9 / E))
  expected, dropped = np_moe(to_numpy(params), x, np.asarray(logits), K, slots=slots)
  assert dropped, "the case should overflow some expert"
  assert_close(y, expected, 1e-5)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), len(dropped) / (K * B * 9),
                             rtol=1e-6)


def test_a_token_whose_assignments_all_drop_gets_zero_output():
  x, _ = _inputs(time=4)
  # every token prefers experts 0 then 1; one slot each: only token 0 is served.
  logits = jnp.broadcast_to(jnp.array([3.0, 2.0, 0.0, -1.0]), (B, 4, E))
  model = _moe(capacity_factor=0.5)
  params = _params(model, x, logits)
  assert moe.capacity(4, E, K, 0.5) == 1
  y, aux = _run(model)(params, x, logits)
  assert np.all(np.asarray(y[:, 1:]) == 0) and np.all(np.abs(np.asarray(y[:, 0])) > 0)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), 6 / 8, rtol=1e-6)


# ---- (3) load-balance loss --------------------------------------------------

def test_load_balance_loss_on_a_hand_checked_case():
  # E = 3, k = 2: token probabilities (.5 .3 .2) → {0, 1}; (.1 .6 .3) → {1, 2}.
  # f = (1, 2, 1) / (k·N = 4); P = (.3, .45, .25); E Σ f P = 3 (.075 + .225 + .0625).
  logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]]))
  x = jnp.zeros((1, 2, D))
  model = moe.MoEMLP(D, F, num_experts=3, top_k=2)
  _, aux = _run(model)(_params(model, x, logits), x, logits)
  np.testing.assert_allclose(float(aux["load_balance_loss"]), 1.0875, rtol=1e-6)
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  np.testing.assert_allclose(float(aux["router_z_loss"]), np.mean(lse ** 2), atol=1e-7)
  # top-1 on (.75 .25), (.6 .4): f = (1, 0), P = (.675, .325) → 2 · .675.
  logits1 = jnp.log(jnp.array([[[0.75, 0.25], [0.6, 0.4]]]))
  top1 = moe.MoEMLP(D, F, num_experts=2, top_k=1)
  _, aux1 = _run(top1)(_params(top1, x, logits1), x, logits1)
  np.testing.assert_allclose(float(aux1["load_balance_loss"]), 1.35, rtol=1e-6)


def test_load_balance_loss_is_one_for_uniform_routing_and_matches_the_formula():
  # f and P both uniform: each expert takes 1/4 of the assignments and 1/4 of the mass.
  pattern = np.log([[0.3, 0.3, 0.2, 0.2], [0.2, 0.2, 0.3, 0.3]])
  logits = jnp.asarray(np.tile(pattern, (2, 1))[None])                 # [1, 4, E]
  x = jnp.zeros((1, 4, D))
  model = _moe()
  params = _params(model, x, logits)
  _, aux = _run(model)(params, x, logits)
  np.testing.assert_allclose(float(aux["load_balance_loss"]), 1.0, rtol=1e-6)
  x, logits = _inputs(seed=5)
  _, aux = _run(model)(params, x, logits)
  np.testing.assert_allclose(float(aux["load_balance_loss"]),
                             np_load_balance(np.asarray(logits), K), rtol=1e-5)


# ---- (4) gradients -----------------------------------------------------------

@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_gradients_match_central_differences_in_float64(capacity_factor):
  with jax.enable_x64(True):
    f64 = jnp.float64
    x, logits = _inputs(seed=7, time=5)
    x, logits = x.astype(f64), logits.astype(f64)
    model = _moe(capacity_factor=capacity_factor, activation="gelu", dtype=f64,
                 param_dtype=f64)
    params = _params(model, x, logits)
    probe = jax.random.normal(jax.random.key(9), x.shape, f64)

    @jax.jit
    def loss(params, x, logits):
      y, aux = model.apply(params, x, logits)
      return jnp.sum(y * probe) + 0.3 * aux["load_balance_loss"] + 0.1 * aux["router_z_loss"]

    grads = jax.grad(loss, argnums=(0, 1, 2))(params, x, logits)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for which, arg in ((1, x), (2, logits)):
      flat = np.asarray(arg).ravel()
      for i in rng.choice(flat.size, 6, replace=False):
        step = np.zeros_like(flat)
        step[i] = eps
        args = [params, x, logits]
        args[which] = jnp.asarray((flat + step).reshape(arg.shape))
        up = loss(*args)
        args[which] = jnp.asarray((flat - step).reshape(arg.shape))
        numeric = (up - loss(*args)) / (2 * eps)
        analytic = np.asarray(grads[which]).ravel()[i]
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    kernel = params["params"]["fc_in"]["kernel"]
    for idx in [(0, 1, 2), (3, 0, 5), (1, 7, 11)]:
      def at(delta):
        bumped = {"params": dict(params["params"],
                                 fc_in={"kernel": kernel.at[idx].add(delta)})}
        return loss(bumped, x, logits)
      numeric = (at(eps) - at(-eps)) / (2 * eps)
      analytic = grads[0]["params"]["fc_in"]["kernel"][idx]
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


# ---- (5) the recurrent router under nn.scan ---------------------------------

R, LAYERS = 6, 3


class _Layer(nn.Module):
  """One layer of a toy stack: route with the recurrent router, then x + MoE(x)."""

  @nn.compact
  def __call__(self, carry, gru_params):
    x, h = carry
    logits, h = moe.RecurrentRouterStep(E, R, name="router")(x, h, gru_params)
    y, aux = moe.MoEMLP(D, F, num_experts=E, top_k=K, name="moe")(x, logits)
    return (x + y, h), (logits, h, aux["load_balance_loss"])


class _Stack(nn.Module):
  """The pattern of the module docstring: one shared GRU, per-layer W1, W2, MoE."""

  @nn.compact
  def __call__(self, x):
    gru_params = self.param("router_gru", moe.gru_param_init(R))
    h0 = moe.initial_router_state(x.shape[0], x.shape[1], R)
    scan = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=LAYERS,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    (x, _), per_layer = scan(name="layers")((x, h0), gru_params)
    return x, per_layer


@functools.cache
def _stack_setup():
  """``(stack, x, params, jitted apply)``, built once for the stack tests."""
  x, _ = _inputs(seed=11)
  stack = _Stack()
  return stack, x, _params(stack, x), jax.jit(stack.apply)


def test_recurrent_router_shares_one_gru_and_stacks_the_per_layer_projections():
  stack, x, params, _ = _stack_setup()
  p = params["params"]
  gru_shapes = {name: {k: v.shape for k, v in leaf.items()}
                for name, leaf in p["router_gru"].items()}
  with_bias = ("ir", "iz", "in", "hn")
  assert gru_shapes == {n: {"kernel": (R, R), **({"bias": (R,)} if n in with_bias else {})}
                        for n in ("ir", "iz", "in", "hr", "hz", "hn")}
  assert p["layers"]["router"]["router_in"]["kernel"].shape == (LAYERS, D, R)
  assert p["layers"]["router"]["router_out"]["kernel"].shape == (LAYERS, R, E)
  assert p["layers"]["moe"]["gate_proj"]["kernel"].shape == (LAYERS, E, D, F)
  assert len(jax.tree_util.tree_leaves(p)) == 10 + 2 + 3   # GRU: 6 kernels, 4 biases
  boxed = jax.eval_shape(stack.init, jax.random.key(0), x)
  specs = nn.get_partition_spec(boxed)["params"]["layers"]
  assert tuple(specs["router"]["router_in"]["kernel"]) == ("layers", "embed", None)
  assert tuple(specs["moe"]["up_proj"]["kernel"]) == ("layers", "expert", "embed", "mlp")


def test_recurrent_router_is_the_depth_recurrence_with_h0_zero():
  _, x, params, apply = _stack_setup()
  out, (logits, hs, _) = apply(params, x)
  assert logits.shape == (LAYERS, B, T, E) and hs.shape == (LAYERS, B, T, R)
  p = to_numpy(params)
  gru, layer_params = p["router_gru"], p["layers"]
  xi, h = np.asarray(x, np.float64), np.zeros((B, T, R))
  for i in range(LAYERS):
    at = lambda tree: jax.tree_util.tree_map(lambda a: a[i], tree)
    h = np_gru(gru, h, xi @ layer_params["router"]["router_in"]["kernel"][i])
    ref_logits = h @ layer_params["router"]["router_out"]["kernel"][i]
    assert_close(hs[i], h, 1e-5, f"h_{i + 1}")
    assert_close(logits[i], ref_logits, 1e-5, f"logits of layer {i}")
    y, _ = np_moe(at(layer_params["moe"]), xi, ref_logits, K)
    xi = xi + y
  assert_close(out, xi, 1e-5, "stack output")


def test_router_state_at_a_layer_depends_on_earlier_layers_only():
  _, x, params, apply = _stack_setup()
  _, (logits, hs, _) = apply(params, x)
  for j in range(LAYERS):
    bumped = jax.tree_util.tree_map(lambda a: a, params)
    w1 = bumped["params"]["layers"]["router"]["router_in"]["kernel"]
    bumped["params"]["layers"]["router"]["router_in"]["kernel"] = w1.at[j].add(0.5)
    _, (logits_j, hs_j, _) = apply(bumped, x)
    for i in range(LAYERS):
      same = np.array_equal(np.asarray(hs_j[i]), np.asarray(hs[i]))
      assert same == (i < j), f"W1 of layer {j} changed h of layer {i}: {not same}"
      assert np.array_equal(np.asarray(logits_j[i]), np.asarray(logits[i])) == (i < j)
  # and the shared GRU changes every layer's state
  bumped = jax.tree_util.tree_map(lambda a: a, params)
  bumped["params"]["router_gru"]["hn"]["bias"] = bumped["params"]["router_gru"]["hn"]["bias"] + 0.5
  _, (_, hs_g, _) = apply(bumped, x)
  assert all(not np.array_equal(np.asarray(hs_g[i]), np.asarray(hs[i])) for i in range(LAYERS))


def test_linear_router_is_a_per_layer_projection_in_float32():
  x, _ = _inputs()
  router = moe.LinearRouter(E)
  params = _params(router, x)
  logits = _run(router)(params, x.astype(jnp.bfloat16))
  assert logits.dtype == jnp.float32 and logits.shape == (B, T, E)
  expected = np.asarray(x.astype(jnp.bfloat16), np.float64) @ to_numpy(params)["gate"]["kernel"]
  assert_close(logits, expected, 1e-5)


# ---- (6) bfloat16 ----------------------------------------------------------

@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_bfloat16_compute_stays_within_2e_2_of_float32(capacity_factor):
  x, logits = _inputs(seed=13)
  model = _moe(capacity_factor=capacity_factor)
  params = _params(model, x, logits)
  y32, aux32 = _run(model)(params, x, logits)
  y16, aux16 = _run(_moe(capacity_factor=capacity_factor, dtype=jnp.bfloat16))(
      params, x.astype(jnp.bfloat16), logits)
  assert y16.dtype == jnp.bfloat16
  assert_close(y16, y32, 2e-2)
  for name in aux32:
    assert aux16[name].dtype == jnp.float32
    np.testing.assert_allclose(float(aux16[name]), float(aux32[name]), rtol=1e-6)


# ---- (7) masks ---------------------------------------------------------------

@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_mask_excludes_padding_from_statistics_outputs_and_capacity(capacity_factor):
  x, logits = _inputs(seed=17, time=8)
  # three padding tokens at the start of row 0, all routed to experts 0 and 1
  logits = logits.at[0, :3].set(jnp.array([9.0, 8.0, 0.0, 0.0]))
  mask = np.ones((B, 8), bool)
  mask[0, :3] = False
  model = _moe(capacity_factor=capacity_factor)
  params = _params(model, x, logits)
  y, aux = _run(model)(params, x, logits, jnp.asarray(mask))
  slots = None if capacity_factor is None else moe.capacity(8, E, K, capacity_factor)
  expected, dropped = np_moe(to_numpy(params), x, np.asarray(logits), K, slots=slots, mask=mask)
  assert_close(y, expected, 1e-5)
  assert np.all(np.asarray(y)[~mask] == 0)
  np.testing.assert_allclose(float(aux["load_balance_loss"]),
                             np_load_balance(np.asarray(logits), K, mask), rtol=1e-5)
  valid = np.asarray(logits, np.float64)[mask]
  lse = np.log(np.exp(valid).sum(-1))
  np.testing.assert_allclose(float(aux["router_z_loss"]), np.mean(lse ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), len(dropped) / (K * mask.sum()),
                             rtol=1e-6)


# ---- configuration errors and the sharding rule ----------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=2, top_k=3), "top_k=3 exceeds num_experts=2"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0; expected > 0"),
    (dict(activation="relu"), "activation='relu'; expected one of swiglu, gelu"),
    (dict(num_experts=0), "num_experts=0; expected a positive int"),
])
def test_bad_configs_name_the_value_and_what_was_expected(kwargs, message):
  x = jnp.zeros((1, 2, D))
  logits = jnp.zeros((1, 2, kwargs.get("num_experts", E)))
  with pytest.raises(ValueError, match=message):
    moe.MoEMLP(D, F, **kwargs).init(jax.random.key(0), x, logits)


def test_bad_shapes_name_the_shape_and_what_was_expected():
  x = jnp.zeros((1, 2, D))
  with pytest.raises(ValueError,
                     match=r"router_logits have shape \[1, 2, 3\]; expected \[1, 2, 4\]"):
    _moe().init(jax.random.key(0), x, jnp.zeros((1, 2, 3)))
  with pytest.raises(ValueError, match=r"mask has shape \[2\]; expected \[1, 2\]"):
    _moe().init(jax.random.key(0), x, jnp.zeros((1, 2, E)), jnp.ones((2,)))
  with pytest.raises(ValueError, match=r"h_prev has shape \[1, 2, 5\]; expected \[1, 2, 6\]"):
    gru = jax.eval_shape(moe.gru_param_init(R), jax.random.key(1))
    moe.RecurrentRouterStep(E, R).init(jax.random.key(0), x, jnp.zeros((1, 2, 5)),
                                       jax.tree_util.tree_map(jnp.zeros_like, gru))


def test_the_suggested_expert_rule_shards_experts_over_tensor_and_leaves_mlps_alone():
  # The rule to add to sharding.RULES, before ("mlp", "tensor"): rules are
  # matched in order and a mesh axis is used once per array, so expert
  # kernels shard E over `tensor` and keep F whole, dense MLPs are unchanged.
  rules = list(sharding.RULES)
  rules.insert(rules.index(("mlp", "tensor")), ("expert", "tensor"))
  to_mesh = lambda names: tuple(nn.logical_to_mesh_axes(names, rules))
  assert to_mesh(("expert", "embed", "mlp")) == ("tensor", "fsdp", None)
  assert to_mesh(("layers", "expert", "mlp", "embed")) == (None, "tensor", None, "fsdp")
  assert to_mesh(("embed", "mlp")) == ("fsdp", "tensor")
