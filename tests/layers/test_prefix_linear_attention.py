"""JRT-RNN's prefix linear attention against a loop over its equations.

Tolerances: float32 layer against a float64 numpy loop, 1e-5 of the output's
largest magnitude; gradients against a dense jnp form of the same equations,
1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recurrent_lm.layers.prefix_linear_attention import PrefixLinearAttention
from tests.layers._util import assert_close, params_of, perturb, to_numpy

D, HEADS, FEATURES, PREFIX = 16, 2, 4, 5


def _model(**kwargs):
  return PrefixLinearAttention(D, num_heads=HEADS, prefix_len=PREFIX, feature_dim=FEATURES,
                               chunk_size=4, **kwargs)


def _taylor(x):
  d = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  return np.concatenate([np.ones_like(x[..., :1]), x * d ** -0.25, outer / np.sqrt(2 * d)], -1)


def _reference(p, x, causal_encoder=False):
  """One document ``x`` ``[T, D]``: the module docstring's sums, token by token.

  ``causal_encoder`` reads the prefix only up to the current token: what a
  prefix split into calls of one token gives.
  """
  proj = lambda name: np.einsum("td,dhf->thf", x, p[name]["kernel"])
  q, k, v = _taylor(proj("q_proj")), _taylor(proj("k_proj")), proj("v_proj")
  k_enc, v_enc = _taylor(proj("k_enc_proj")), proj("v_enc_proj")
  outputs = []
  for i in range(x.shape[0]):
    enc_end = min(i + 1, PREFIX) if causal_encoder else PREFIX
    num = (np.einsum("hk,jhk,jhv->hv", q[i], k[:i + 1], v[:i + 1])
           + np.einsum("hk,jhk,jhv->hv", q[i], k_enc[:enc_end], v_enc[:enc_end]))
    den = (np.einsum("hk,jhk->h", q[i], k[:i + 1])
           + np.einsum("hk,jhk->h", q[i], k_enc[:enc_end]))
    outputs.append(num / (den[:, None] + 1e-6))
  return np.einsum("thv,hvd->td", np.stack(outputs), p["o_proj"]["kernel"])


def _setup(time=13, seed=0):
  model = _model()
  x = jax.random.normal(jax.random.key(seed), (2, time, D))
  return model, x, perturb(params_of(model, x))


def test_every_token_reads_the_whole_prefix_of_its_document():
  model, x, params = _setup()
  y, _ = jax.jit(model.apply)(params, x)
  p, xs = to_numpy(params), np.asarray(x, np.float64)
  for row in range(2):
    assert_close(y[row], _reference(p, xs[row]), 1e-5, f"row {row}")


def test_packed_documents_have_one_prefix_each():
  model, x, params = _setup()
  lengths = [[3, 8, 2], [7, 6]]        # documents shorter and longer than the prefix
  segment_ids = jnp.asarray([np.repeat(np.arange(len(l)), l) for l in lengths])
  y, _ = jax.jit(model.apply)(params, x, segment_ids=segment_ids)
  p, xs = to_numpy(params), np.asarray(x, np.float64)
  for row in range(2):
    start = 0
    for length in lengths[row]:
      assert_close(y[row, start:start + length], _reference(p, xs[row, start:start + length]),
                   1e-5, f"row {row} document at {start}")
      start += length


def test_decoding_after_a_prefill_of_the_prefix_continues_the_one_call():
  model, x, params = _setup()
  apply = jax.jit(model.apply)
  y_full, state_full = apply(params, x)
  y, state = apply(params, x[:, :PREFIX + 2])
  ys = [y]
  for t in range(PREFIX + 2, x.shape[1]):
    y, state = apply(params, x[:, t:t + 1], state)
    ys.append(y)
  assert_close(jnp.concatenate(ys, 1), y_full, 1e-5, "y")
  for name, a, b in zip(("S", "z"), state[:2], state_full[:2]):
    assert_close(a, b, 1e-5, name)
  np.testing.assert_array_equal(state[2], [x.shape[1]] * 2)


def test_a_prefix_split_into_single_tokens_is_read_causally():
  model, x, params = _setup(time=9)
  apply = jax.jit(model.apply)
  state, ys = model.init_state(2), []
  for t in range(x.shape[1]):
    y, state = apply(params, x[:, t:t + 1], state)
    ys.append(y)
  p, xs = to_numpy(params), np.asarray(x, np.float64)
  expected = _reference(p, xs[0], causal_encoder=True)
  assert_close(jnp.concatenate(ys, 1)[0], expected, 1e-5, "token by token")


def _dense(params, x):
  """The module docstring's equations as dense ``[T, T]`` masks, in jnp."""
  p = params["params"]
  phi = lambda a: jnp.asarray(_taylor_jnp(a))
  proj = lambda name: jnp.einsum("btd,dhf->bthf", x, p[name]["kernel"])
  q, k, v = phi(proj("q_proj")), phi(proj("k_proj")), proj("v_proj")
  k_enc, v_enc = phi(proj("k_enc_proj")), proj("v_enc_proj")
  time = x.shape[1]
  causal = jnp.tril(jnp.ones((time, time)))
  prefix = jnp.broadcast_to(jnp.arange(time) < PREFIX, (time, time)).astype(jnp.float32)
  scores = jnp.einsum("bihk,bjhk->bhij", q, k) * causal
  scores_enc = jnp.einsum("bihk,bjhk->bhij", q, k_enc) * prefix
  num = (jnp.einsum("bhij,bjhv->bihv", scores, v)
         + jnp.einsum("bhij,bjhv->bihv", scores_enc, v_enc))
  den = (scores.sum(-1) + scores_enc.sum(-1)).transpose(0, 2, 1)[..., None]
  return jnp.einsum("bthv,hvd->btd", num / (den + 1e-6), p["o_proj"]["kernel"])


def _taylor_jnp(x):
  d = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
  return jnp.concatenate([jnp.ones_like(x[..., :1]), x * d ** -0.25,
                          outer / jnp.sqrt(2.0 * d)], -1)


def test_gradients_equal_those_of_the_dense_form():
  model, x, params = _setup()
  cotangent = jax.random.normal(jax.random.key(5), x.shape)
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) * cotangent)
  grads = jax.jit(jax.grad(loss(lambda p, x: model.apply(p, x)[0]), argnums=(0, 1)))(params, x)
  grads_ref = jax.jit(jax.grad(loss(_dense), argnums=(0, 1)))(params, x)
  for (path, g), g_ref in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                              jax.tree_util.tree_leaves(grads_ref)):
    assert_close(g, g_ref, 1e-4, jax.tree_util.keystr(path))


def test_bad_prefix_len_is_one_clear_error():
  with pytest.raises(ValueError, match=r"prefix_len=0; expected a positive int"):
    PrefixLinearAttention(D, num_heads=HEADS, prefix_len=0).init_state(1)
