"""HMT around a backbone: state passing, packing, causality, bounded state,
gradients (finite differences, BPTT blocks), recall masking, config errors.

Sizes: segments of L = 4 tokens, summaries of j = 2, k = 2 previous tokens,
N = 2 memories (so the FIFO evicts within 19 tokens), backbones of width 32
and 2 layers: a GPT (attention, learned positions) and a qLSTM.

Tolerances: float32; logits and states agree to 1e-4 of their largest
magnitude (the backbone runs each segment inside differently laid out
frames, so summation orders differ). Finite differences are central, in
float32 (the backbone computes in float32), along the gradient, with ε per
parameter (``EPS``) and a 2e-2 relative tolerance.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm import models
from recurrent_lm.models import hmt
from tests.layers._util import assert_close, assert_trees_close, perturb

VOCAB = 97
BATCH = 2
TIME = 19
L, J, N, K = 4, 2, 2, 2

BACKBONES = {
    "gpt": models.ModelConfig.from_dict(dict(
        vocab_size=VOCAB, d_model=32, num_layers=2, mlp="gelu", norm="layernorm",
        positions="learned", max_len=16,
        layout=[{"mixer": "attention", "num_heads": 2, "max_len": 16}])),
    "qlstm": models.ModelConfig.from_dict(dict(
        vocab_size=VOCAB, d_model=32, num_layers=2, mlp="gelu", norm="layernorm",
        layout=[{"mixer": "qlstm", "num_heads": 2}])),
}
NAMES = sorted(BACKBONES)


def _config(name, bptt_segments=2):
  return hmt.HMTConfig(backbone=BACKBONES[name], segment_len=L, summary_len=J,
                       num_memories=N, prev_tokens=K, bptt_segments=bptt_segments)


def _tokens(seed, batch=BATCH, time=TIME):
  """Random token ids (drawn by numpy: ``jax.random`` compiles once per shape)."""
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, time)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _params(name):
  """Parameters of HMT around backbone ``name`` (they do not depend on ``bptt_segments``)."""
  params = jax.jit(hmt.HMT(_config(name)).init)(jax.random.key(0), _tokens(0, 1, 1))
  return perturb(nn.meta.unbox(params), scale=0.02)


@functools.lru_cache(maxsize=None)
def _setup(name, bptt_segments=2):
  """``(model, params, apply)``, shared by the tests of this file.

  ``apply(params, tokens, state, segment_ids)`` is one jitted function always
  called with all four arguments and a state (never None), so calls of one
  shape share one compilation; everything is deterministic, so sharing
  changes no result.
  """
  model = hmt.HMT(_config(name, bptt_segments))
  jitted = jax.jit(model.apply)
  return model, _params(name), lambda p, x, state, ids=None: jitted(p, x, state, ids)


def _run(name, tokens, segment_ids=None):
  model, params, apply = _setup(name)
  return apply(params, tokens, model.init_state(tokens.shape[0]), segment_ids)


@functools.lru_cache(maxsize=None)
def _fresh_apply(name):
  """``apply(params, tokens)``: no state, no segment ids (the program without call B)."""
  return jax.jit(hmt.HMT(_config(name)).apply)


def _fresh(name, tokens):
  return _fresh_apply(name)(_params(name), tokens)


@pytest.mark.parametrize("name", NAMES)
def test_whole_equals_pieces_equals_token_by_token(name):
  model, params, apply = _setup(name)
  tokens = _tokens(1)
  whole, whole_state = _fresh(name, tokens)
  # Pieces of 6 start at segment offsets 0, 2, 0, 2: segments start inside
  # windows (the second backbone call) and partial segments are carried.
  state, pieces = model.init_state(BATCH), []
  for start in range(0, TIME, 6):
    logits, state = apply(params, tokens[:, start:start + 6], state)
    pieces.append(logits)
  assert_close(np.concatenate(pieces, axis=1), whole, what="pieces")
  assert_trees_close(state, whole_state, what="state after pieces")
  state, steps = model.init_state(BATCH), []
  for t in range(TIME):
    logits, state = apply(params, tokens[:, t:t + 1], state)
    steps.append(logits)
  assert_close(np.concatenate(steps, axis=1), whole, what="token by token")
  assert_trees_close(state, whole_state, what="state after token by token")
  np.testing.assert_array_equal(whole_state["num_memories"], [N, N])


@pytest.mark.parametrize("name", NAMES)
def test_packed_row_equals_documents_one_by_one(name):
  """Documents start mid-window and mid-segment-grid; one is a single token."""
  tokens = _tokens(2)
  lengths = [6, 1, 6, 6]
  segment_ids = jnp.asarray(np.repeat([[3, 4, 9, 10]], lengths, axis=1).repeat(BATCH, 0))
  packed, _ = _run(name, tokens, segment_ids)
  one_document, _ = _run(name, tokens, jnp.zeros_like(segment_ids))
  assert_close(one_document, _fresh(name, tokens)[0], what="a row of one document")
  start = 0
  for length in lengths:
    alone, _ = _run(name, tokens[:, start:start + length])
    assert_close(packed[:, start:start + length], alone, what=f"document at {start}")
    start += length


@pytest.mark.parametrize("name", NAMES)
def test_no_position_sees_its_own_or_a_later_token(name):
  """Changing token t changes no logit before t.

  (The paper's recall, from a summary of the segment's own first j tokens,
  would let positions 0 … j−2 of a segment read its token j−1: t = 5 and 9.)
  """
  tokens = _tokens(3)
  base, _ = _fresh(name, tokens)
  for t in (1, 5, 9, 14, 18):      # segment starts are 0, 4, 8, 12, 16
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
    logits, _ = _fresh(name, changed)
    assert_close(logits[:, :t], base[:, :t], rtol=1e-6, what=f"logits before {t}")
    assert float(jnp.max(jnp.abs(logits[:, t] - base[:, t]))) > 1e-4, f"token {t} unread"
  # A token's effect reaches later segments through the memory and the summary.
  changed = tokens.at[:, 1].set((tokens[:, 1] + 1) % VOCAB)
  logits, _ = _fresh(name, changed)
  assert float(jnp.max(jnp.abs(logits[:, 12:] - base[:, 12:]))) > 1e-5


def test_state_keeps_its_shape_over_many_decode_steps():
  model, params, apply = _setup("qlstm")
  tokens = _tokens(4, time=60)
  initial = model.init_state(BATCH)
  state = initial
  for t in range(60):
    _, state = apply(params, tokens[:, t:t + 1], state)
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)
  assert shapes(state) == shapes(initial)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state))
  np.testing.assert_array_equal(state["position"], [60, 60])
  np.testing.assert_array_equal(state["num_memories"], [N, N])


def test_recall_attends_only_to_filled_slots():
  rng = np.random.default_rng(0)
  summary = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
  memory = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.float32)
  w_query, w_key = (jnp.asarray(rng.standard_normal((8, 5)), jnp.float32) for _ in range(2))
  count = jnp.array([0, 1, 3])
  recalled, weights = hmt.memory_recall(summary, memory, count, w_query, w_key)
  garbage = memory.at[:, 0].set(1e3)                 # slot 0 is unfilled in every row
  again, _ = hmt.memory_recall(summary, garbage, count, w_query, w_key)
  np.testing.assert_array_equal(recalled, again)
  np.testing.assert_array_equal(weights[0], 0.0)     # an empty cache recalls 0
  np.testing.assert_array_equal(recalled[0], 0.0)
  np.testing.assert_allclose(recalled[1], memory[1, 3], rtol=1e-6)   # one memory: itself
  np.testing.assert_allclose(weights[2].sum(), 1.0, rtol=1e-6)
  assert weights[2, 0] == 0.0 and np.all(weights[2, 1:] > 0)
  # Reference: the softmax over the filled slots only.
  scores = np.einsum("r,nr->n", summary[2] @ w_query, memory[2, 1:] @ w_key) / np.sqrt(5)
  expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
  np.testing.assert_allclose(weights[2, 1:], expected, rtol=1e-5)


def test_the_model_reads_no_unfilled_memory_slot():
  model, params, apply = _setup("gpt")
  tokens = _tokens(5, time=8)
  state = model.init_state(BATCH)
  for t in range(5):                               # one segment written: 1 of 2 slots
    _, state = apply(params, tokens[:, t:t + 1], state)
  np.testing.assert_array_equal(state["num_memories"], [1, 1])
  spoiled = {**state, "memory": state["memory"].at[:, 0].set(1e3)}
  for t in range(5, 8):
    logits, state = apply(params, tokens[:, t:t + 1], state)
    spoiled_logits, spoiled = apply(params, tokens[:, t:t + 1], spoiled)
    np.testing.assert_array_equal(spoiled_logits, logits)


@functools.lru_cache(maxsize=None)
def _loss_and_grad():
  """Mean next-token loss over the positions in ``where`` ``[1, 16]``, and its gradient.

  On four segments [0, 4), [4, 8), [8, 12), [12, 16) of one document, with
  BPTT blocks of 3 segments: the cache is cut entering segment 3. (From a
  fresh state every segment starts at a window start: the second backbone
  call is left out, which halves the compile time.)
  """
  model, _, _ = _setup("qlstm", 3)

  def loss(params, tokens, where):
    logits, _ = model.apply(params, tokens[:, :-1])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * where) / jnp.sum(where)
  return jax.jit(jax.value_and_grad(loss))


SEGMENT = [jnp.zeros((1, 16)).at[:, 4 * n:4 * n + 4].set(1.0) for n in range(4)]
FIRST_BLOCK = SEGMENT[0] + SEGMENT[1] + SEGMENT[2]
# ε per parameter (None: all of them), where truncation and float32 rounding
# errors were both measured at ≤ 0.5% of the derivative (the token vectors
# have norm ~0.1, so they need a smaller step than the recall matrices).
EPS = {None: 3e-3, "summary_token": 3e-3, "first_memory_token": 3e-3, "recall_query": 2e-2,
       "recall_key": 2e-2}


def _directional(params, tokens, where, direction, eps):
  """(⟨∇f, v⟩, central difference of f along v)."""
  loss_and_grad = _loss_and_grad()
  shifted = lambda s: jax.tree_util.tree_map(lambda p, v: p + s * v, params, direction)
  analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(
      jax.tree_util.tree_leaves(loss_and_grad(params, tokens, where)[1]),
      jax.tree_util.tree_leaves(direction)))
  numeric = (float(loss_and_grad(shifted(eps), tokens, where)[0])
             - float(loss_and_grad(shifted(-eps), tokens, where)[0])) / (2 * eps)
  return analytic, numeric


def _unit(grad, name=None):
  """``grad`` restricted to the parameter ``name`` (all when None), of norm 1.

  The steepest direction gives the largest difference quotient for a given ε
  (float32 rounding of the loss is the error that matters). A wrong gradient
  g still fails: the quotient estimates ⟨∇f, g⟩ / |g|, which equals the
  claimed |g| only when ⟨∇f − g, g⟩ = 0.
  """
  keep = lambda path: name is None or jax.tree_util.keystr(path).endswith(f"['{name}']")
  grad = jax.tree_util.tree_map_with_path(lambda path, g: g if keep(path) else 0 * g, grad)
  norm = np.sqrt(sum(float(jnp.vdot(g, g)) for g in jax.tree_util.tree_leaves(grad)))
  return jax.tree_util.tree_map(lambda g: g / norm, grad)


def test_gradients_match_finite_differences():
  """On the loss of the first BPTT block (segments 0–2), where no gradient is cut."""
  _, params, _ = _setup("qlstm", 3)
  tokens = _tokens(6, batch=1, time=17)
  grad = _loss_and_grad()(params, tokens, FIRST_BLOCK)[1]
  for name, eps in EPS.items():
    analytic, numeric = _directional(params, tokens, FIRST_BLOCK, _unit(grad, name), eps)
    assert abs(numeric) > 1e-5, f"{name} has no effect"
    assert abs(analytic - numeric) <= 2e-2 * abs(numeric), (name, analytic, numeric)


def test_gradients_flow_through_the_memory_within_a_bptt_block_only():
  """E_0 (the first segment's write token) reaches later losses only through m_0.

  Blocks of 3 segments: from segment 1's loss its gradient crosses one memory
  hand-off, from segment 2's two (m_0 → P_1 → m_1 → P_2, and m_0 → P_2) and
  matches finite differences; the cache is cut entering segment 3, so that
  gradient is exactly 0 although segment 3's loss still depends on E_0.
  """
  _, params, _ = _setup("qlstm", 3)
  loss_and_grad = _loss_and_grad()
  tokens = _tokens(7, batch=1, time=17)
  eps = EPS["first_memory_token"]
  grad = lambda where: loss_and_grad(params, tokens, where)[1]
  e0 = lambda where: grad(where)["params"]["first_memory_token"]
  assert float(jnp.max(jnp.abs(e0(SEGMENT[1])))) > 1e-6, "no gradient through one hand-off"
  direction = _unit(grad(SEGMENT[2]), "first_memory_token")
  analytic, numeric = _directional(params, tokens, SEGMENT[2], direction, eps)
  assert abs(numeric) > 1e-5 and abs(analytic - numeric) <= 2e-2 * abs(numeric), (
      analytic, numeric)
  _, numeric = _directional(params, tokens, SEGMENT[3], direction, eps)
  assert abs(numeric) > 1e-5, "segment 3 does not depend on E_0"
  np.testing.assert_array_equal(e0(SEGMENT[3]), 0.0)


@pytest.mark.parametrize("change, message", [
    ({"segment_len": 0}, r"hmt.segment_len=0; expected an int >= 1"),
    ({"summary_len": 5}, r"hmt.summary_len=5 exceeds hmt.segment_len=4"),
    ({"prev_tokens": -1}, r"hmt.prev_tokens=-1; expected an int >= 0"),
    ({"bptt_segments": 1.5}, r"hmt.bptt_segments=1.5; expected an int >= 1"),
    ({"num_memories": 0}, r"hmt.num_memories=0"),
    ({"recall_dim": 0}, r"hmt.recall_dim=0; expected a positive int or None"),
    ({"segment_len": 14}, r"hmt.backbone.max_len=16 is shorter than a segment's run .* = 18"),
    ({"colour": "blue"}, r"unknown hmt config field\(s\) \['colour'\]"),
    ({"backbone": {**BACKBONES["gpt"].to_dict(), "d_model": 0}}, r"model.d_model=0"),
])
def test_bad_config_is_one_clear_error(change, message):
  config = {**_config("gpt").to_dict(), **change}
  with pytest.raises(ValueError, match=message):
    hmt.HMTConfig.from_dict(config)


def test_a_non_causal_backbone_is_refused():
  jrt = models.presets.get("jrt_cpu_small", vocab_size=VOCAB, max_len=16)
  with pytest.raises(ValueError, match=r"prefix mixers \(prefix_len=8\)"):
    hmt.HMTConfig(backbone=jrt, segment_len=4, summary_len=2, prev_tokens=1)


def test_config_round_trips_through_plain_data():
  config = _config("qlstm")
  assert hmt.HMTConfig.from_dict(config.to_dict()) == config


def test_state_bytes_counts_the_carried_state():
  config = hmt.hmt_cpu_small(vocab_size=VOCAB, max_len=512)
  assert config.segment_len == 128 and config.backbone == models.presets.get(
      "qlstm_cpu_small", VOCAB, max_len=128 + 16 + 2)
  per_row = 4 + (16 + 128 - 1) * 4 + 32 * 128 * 4 + 4 + 128 * 4   # position, tokens, M, count, P
  assert hmt.state_bytes(config) == per_row
  assert hmt.state_bytes(config, batch_size=3) == 3 * per_row
  gpt = hmt.hmt_cpu_small(vocab_size=VOCAB, max_len=512, backbone="gpt")
  assert gpt.backbone.positions == "learned" and gpt.backbone.max_len == 146


def test_backbone_hook_replaces_embeddings_and_returns_hidden_states():
  """``LanguageModel(embeddings=, embedding_mask=, return_hidden=)``, HMT's entry."""
  _, params, _ = _setup("gpt")
  backbone = models.LanguageModel(BACKBONES["gpt"])
  variables = {"params": params["params"]["backbone"]}
  tokens = _tokens(8, time=6)
  table = variables["params"]["embedding"]
  mask = jnp.zeros(tokens.shape, bool).at[:, 3].set(True)

  @jax.jit
  def calls(variables):
    plain, _ = backbone.apply(variables, tokens)
    same, _, hidden = backbone.apply(variables, jnp.zeros_like(tokens),
                                     embeddings=table[tokens], return_hidden=True)
    swapped, _ = backbone.apply(variables, tokens, embeddings=jnp.zeros((BATCH, 6, 32)),
                                embedding_mask=mask)
    return plain, same, hidden, swapped
  plain, same, hidden, swapped = calls(variables)
  assert_close(same, plain, what="embeddings given instead of tokens")
  assert_close(hidden @ variables["params"]["logits"]["kernel"], plain, what="head of hidden")
  assert_close(swapped[:, :3], plain[:, :3], what="before the replaced position")
  assert float(jnp.max(jnp.abs(swapped[:, 3] - plain[:, 3]))) > 1e-4
