"""TitansMAC against a per-segment loop of the MAC equations, and its state passing.

The reference walks one document token by token in numpy float64: at every
segment start (document position ≡ 0 mod C) it fixes the retrieval memory G;
each token retrieves ``M_G(q^x)``, attends over the persistent keys and the
(retrieved, input) pairs of its segment so far, takes one memory step at G
with momentum and decay, and gates the attention output with the read of the
updated memory. It shares no code with the layer's blocks and two phases.

Tolerances: 1e-4 of the largest magnitude (float32 against float64, and
products of gates as differences of cumulative logs against a loop); pieces,
packing and token-by-token against one call likewise.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm.layers.titans_mac import TitansMAC
from tests.layers._util import (assert_close, assert_trees_close, params_of, perturb, sigmoid,
                                silu, to_numpy)

D, HEADS, CHUNK, TIME, BATCH = 32, 2, 4, 19, 2
MAX_LR = 0.2    # large steps, so that a wrong memory shows in the outputs
RTOL = 1e-4


def _model(**kw):
  """Without the gradient clip: the reference is the unclipped equations."""
  return TitansMAC(D, num_heads=HEADS, chunk_size=CHUNK, expansion=2, max_lr=MAX_LR,
                   max_grad_norm=None, **kw)


@functools.lru_cache(maxsize=None)
def _setup(memory="mlp"):
  """``(model, perturbed params, jitted apply)``; :func:`_run` passes every
  argument of apply explicitly, so one length compiles once."""
  model = _model(memory=memory)
  params = perturb(params_of(model, _inputs(TIME)))
  return model, params, jax.jit(model.apply)


def _inputs(time, seed=0, batch=BATCH):
  return jax.random.normal(jax.random.key(seed), (batch, time, D), jnp.float32)


def _run(model, apply, params, x, state=None, segment_ids=None):
  state = model.init_state(x.shape[0]) if state is None else state
  if segment_ids is None:
    segment_ids = jnp.zeros(x.shape[:2], jnp.int32)
  return apply(params, x, state, segment_ids)


# The reference, in numpy float64.

def _gelu(z):   # jax.nn.gelu's default tanh form
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def _gelu_grad(z):
  t = np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))
  return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * z * z)


def _l2norm(a):
  return a / np.sqrt(np.sum(a * a, -1, keepdims=True) + 1e-6)


def _memory_read(w, q):
  """``M_W(q)`` per head: leaves ``[H, ...]``, q ``[H, d]``."""
  if "w" in w:
    return np.einsum("hk,hkv->hv", q, w["w"])
  return q + np.einsum("hf,hfv->hv", _gelu(np.einsum("hk,hkf->hf", q, w["w1"])), w["w2"])


def _memory_grad(w, k, v):
  """``∇_W ‖M_W(k) − v‖²`` per head, by hand."""
  if "w" in w:
    e = np.einsum("hk,hkv->hv", k, w["w"]) - v
    return {"w": 2 * k[:, :, None] * e[:, None, :]}
  z = np.einsum("hk,hkf->hf", k, w["w1"])
  e = k + np.einsum("hf,hfv->hv", _gelu(z), w["w2"]) - v
  dz = np.einsum("hv,hfv->hf", 2 * e, w["w2"]) * _gelu_grad(z)
  return {"w1": k[:, :, None] * dz[:, None, :], "w2": _gelu(z)[:, :, None] * 2 * e[:, None, :]}


def _reference(p, x, chunk=CHUNK, max_lr=MAX_LR):
  """One document ``x`` ``[T, D]`` → ``(y [T, D], memory, momentum)``."""
  heads = lambda a, name: np.einsum("d,dhk->hk", a, p[name])
  merge = lambda a, name: np.einsum("hk,hkd->d", a, p[name])
  memory = {n[len("memory_"):]: p[n] for n in ("memory_w", "memory_w1", "memory_w2") if n in p}
  momentum = {n: np.zeros_like(w) for n, w in memory.items()}
  head_dim = p["q_proj"].shape[-1]
  ys = []
  for start in range(0, len(x), chunk):
    grad_memory = dict(memory)
    keys, values = [], []
    for t in range(start, min(start + chunk, len(x))):
      retrieved = merge(_memory_read(grad_memory, _l2norm(silu(heads(x[t], "memory_query_proj")))),
                        "retrieved_proj")
      for a in (retrieved, x[t]):
        keys.append(heads(a, "k_proj"))
        values.append(heads(a, "v_proj"))
      k_all = np.concatenate([p["persistent_key"], np.stack(keys)])       # [N, H, d]
      v_all = np.concatenate([p["persistent_value"], np.stack(values)])
      scores = np.einsum("hk,nhk->hn", heads(x[t], "q_proj"), k_all) / np.sqrt(head_dim)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      y = merge(np.einsum("hn,nhk->hk", weights, v_all), "attention_out_proj")
      y_bar = y / np.sqrt(np.mean(y * y) + 1e-6)
      k = _l2norm(silu(heads(y_bar, "memory_key_proj")))
      v = silu(heads(y_bar, "memory_value_proj"))
      lr, retain, eta = sigmoid(np.einsum("d,dgh->gh", y_bar, p["gate_proj"]) + p["gate_bias"])
      lr = max_lr * lr
      grads = _memory_grad(grad_memory, k, v)
      for n in memory:
        momentum[n] = eta[:, None, None] * momentum[n] - lr[:, None, None] * grads[n]
        memory[n] = retain[:, None, None] * memory[n] + momentum[n]
      read = _memory_read(memory, _l2norm(silu(heads(y_bar, "read_query_proj"))))
      ys.append(merge(y.reshape(read.shape) * sigmoid(read), "o_proj"))
  return np.stack(ys), memory, momentum


@pytest.mark.parametrize("memory", ["mlp", "linear"])
def test_matches_a_per_segment_loop_of_the_mac_equations(memory):
  model, params, apply = _setup(memory)
  x = _inputs(TIME, seed=1)
  y, state = _run(model, apply, params, x)
  p = to_numpy(params)
  for row in range(BATCH):
    y_ref, memory_ref, momentum_ref = _reference(p, np.asarray(x[row], np.float64))
    assert_close(y[row], y_ref, RTOL, f"row {row} y")
    row_state = jax.tree_util.tree_map(lambda s: s[row], state)
    assert_trees_close(row_state["memory"], memory_ref, RTOL, f"row {row} memory")
    assert_trees_close(row_state["momentum"], momentum_ref, RTOL, f"row {row} momentum")
  # The segment grid matters: segments of 1 token give other outputs.
  y_other, _, _ = _reference(p, np.asarray(x[0], np.float64), chunk=1)
  assert np.max(np.abs(y_other - np.asarray(y[0]))) > 100 * RTOL * np.max(np.abs(y_other))


def _pieces(time, rng):
  """Consecutive pieces of lengths 1 or 5 (5 is prime to C, so pieces start
  and end inside segments)."""
  pieces, start = [], 0
  while start < time:
    length = int(rng.choice([1, 5]))
    if start + length > time:
      length = 1
    pieces.append(slice(start, start + length))
    start += length
  return pieces


def test_pieces_and_tokens_with_carried_state_equal_one_call():
  model, params, apply = _setup()
  x = _inputs(TIME, seed=2)
  y_full, state_full = _run(model, apply, params, x)
  for what, pieces in (("pieces", _pieces(TIME, np.random.default_rng(0))),
                       ("tokens", [slice(t, t + 1) for t in range(TIME)])):
    state, ys = None, []
    for piece in pieces:
      y, state = _run(model, apply, params, x[:, piece], state)
      ys.append(y)
    assert_close(jnp.concatenate(ys, 1), y_full, RTOL, f"{what} y")
    assert_trees_close(state, state_full, RTOL, f"{what} state")


def test_packed_row_equals_its_documents_run_alone():
  """Documents start at every offset inside the segment grid of the call."""
  model, params, apply = _setup()
  lengths = [[5, 1, 5, 1, 5, 1, 1], [1, 5, 1, 5, 1, 5, 1]]
  segment_ids = jnp.asarray([np.repeat(np.arange(len(row)), row) for row in lengths], jnp.int32)
  x = _inputs(TIME, seed=3)
  y_packed, state_packed = _run(model, apply, params, x, segment_ids=segment_ids)
  x_next = _inputs(1, seed=4)
  for row in range(BATCH):
    start = 0
    for length in lengths[row]:
      alone = jnp.broadcast_to(x[row, start:start + length], (BATCH, length, D))
      y_doc, state_doc = _run(model, apply, params, alone)
      assert_close(y_packed[row, start:start + length], y_doc[0], RTOL, f"row {row} at {start}")
      start += length
    # The state after the row continues its last document.
    take = lambda tree, r: jax.tree_util.tree_map(
        lambda s: jnp.broadcast_to(s[r], s.shape), tree)
    y_cont, _ = _run(model, apply, params, x_next, take(state_packed, row))
    y_cont_doc, _ = _run(model, apply, params, x_next, take(state_doc, 0))
    assert_close(y_cont[0], y_cont_doc[0], RTOL, f"row {row} continuation")


def test_changing_a_token_changes_no_earlier_output():
  model, params, apply = _setup()
  x = _inputs(TIME, seed=5)
  y, _ = _run(model, apply, params, x)
  for t in (1, 6, 13):
    y_changed, _ = _run(model, apply, params, x.at[:, t].add(1.0))
    assert_close(y_changed[:, :t], y[:, :t], 1e-6, f"changed token {t}")
    assert float(jnp.max(jnp.abs(y_changed[:, t:] - y[:, t:]))) > 1e-3


def test_gradients_match_central_differences_in_float64():
  """A packed row whose second document crosses a segment boundary inside a
  block, so both phases and the carried cache enter the gradient."""
  _, params32, _ = _setup()
  with jax.enable_x64(True):
    model = _model(dtype=jnp.float64, param_dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params32)
    x = jax.random.normal(jax.random.key(6), (1, 9, D), jnp.float64)
    segment_ids = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    probe = jax.random.normal(jax.random.key(7), x.shape, jnp.float64)

    def loss(params, x):
      y, state = model.apply(params, x, segment_ids=segment_ids)
      return jnp.sum(y * probe) + 0.1 * sum(jnp.sum(w) for w in state["memory"].values())

    # One compiled program: its value at shifted points, its gradient at the centre.
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    grads = value_and_grad(params, x)[1]
    rng = np.random.default_rng(0)
    eps = 1e-6
    for i in range(3):
      direction = jax.tree_util.tree_map(
          lambda a: jnp.asarray(rng.standard_normal(a.shape)), (params, x))
      shifted = lambda sign: value_and_grad(*jax.tree_util.tree_map(
          lambda a, d: a + sign * eps * d, (params, x), direction))[0]
      numeric = (shifted(1) - shifted(-1)) / (2 * eps)
      analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree_util.tree_leaves(grads),
                                                      jax.tree_util.tree_leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6, err_msg=f"direction {i}")


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_size=0), r"chunk_size=0; expected a positive int"),
    (dict(num_heads=3), r"d_model=32 is not divisible by num_heads=3"),
    (dict(head_dim=8), r"num_heads=2 x head_dim=8 != d_model=32"),
    (dict(memory="deep"), r"memory='deep'; expected one of linear, mlp"),
])
def test_bad_config_raises_one_clear_line(kwargs, message):
  model = TitansMAC(D, **dict(dict(num_heads=HEADS), **kwargs))
  with pytest.raises(ValueError, match=message):
    model.init_state(1)
