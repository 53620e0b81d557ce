"""Speed settings change how fast training runs, never what it computes.

- `model.scan_layers` and `model.remat` give the same losses, gradients and parameters, step by
  step, through the real compiled train step (jaxformer.train.parallel's strategy);
- the attention kernel: the einsum path matches `jax.nn.dot_product_attention`, and 'auto'
  picks cuDNN's fused kernel only where it can run;
- the unrolled threefry lowering (jaxformer/train/jax_internals.py) draws the same random bits
  as the reference Threefry-2x32 (Salmon et al. 2011, the Random123 known-answer vectors).

bfloat16 training quality is tested by tests/test_bf16_quality.py (two real training runs).
"""

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxformer.config import get_default_config
from jaxformer.errors import ConfigError
from jaxformer.model import attention
from jaxformer.model.transformer import Transformer
from jaxformer.tokens import EOS_ID
from jaxformer.train import jax_internals, parallel, state as state_lib, step as step_lib

from tests.model.model_testing import stack_layers, unstack_layers

STEPS = 3
ROWS, LENGTH, VOCAB = 8, 8, 32
TOLERANCE = 1e-5


def config(dropout_rate: float, **model) -> ml_collections.FrozenConfigDict:
  c = get_default_config()
  c.model.update(vocab_size=VOCAB, num_layers=2, d_model=16, num_heads=2, d_ff=32, max_len=16,
                 dropout_rate=dropout_rate, **model)
  c.data.max_len = LENGTH
  c.train.update(batch_size=ROWS, warmup_steps=2, learning_rate=1.0, seed=0)
  return ml_collections.FrozenConfigDict(c)


def batches(seed: int = 0) -> list[dict[str, np.ndarray]]:
  """STEPS batches of rows with one pair each, of random lengths (so padding matters)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    batch = {}
    for side in ("inputs", "targets"):
      lengths = rng.integers(2, LENGTH + 1, ROWS)
      real = np.arange(LENGTH)[None, :] < lengths[:, None]
      ids = np.where(real, rng.integers(EOS_ID + 1, VOCAB, (ROWS, LENGTH)), 0)
      ids[np.arange(ROWS), lengths - 1] = EOS_ID
      batch[side] = ids.astype(np.int32)
      batch[f"{side}_segment_ids"] = real.astype(np.int32)
      batch[f"{side}_positions"] = np.where(real, np.arange(LENGTH), 0).astype(np.int32)
    out.append(batch)
  return out


def train(cfg, params) -> tuple[list[dict], list]:
  """STEPS updates from `params` by the real train step; (metrics, gradients) of each step.

  One compiled program per config runs `step.train_step` (what every strategy compiles) and
  also returns `step.gradient_sums` (what it differentiates) at the same state, with the
  same dropout key; XLA computes that gradient once for both.
  """
  strategy = parallel.make_strategy(cfg, jax.devices()[:1])  # The model and optimizer it runs.

  @jax.jit
  def step_and_gradients(state, batch):
    rng = step_lib.dropout_key(cfg.train.seed, state.step)
    grads, _ = step_lib.gradient_sums(state.params, batch, model=strategy.model,
                                      label_smoothing=cfg.train.label_smoothing, rng=rng)
    new_state, metrics = step_lib.train_step(state, batch, model=strategy.model,
                                             optimizer=strategy.optimizer, config=cfg)
    return new_state, metrics, grads

  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=strategy.optimizer.init(params))
  metrics, grads = [], []
  for batch in batches():
    micro_batches = jax.tree.map(lambda x: x[None], batch)  # [A=1, B, L], as strategies feed it.
    state, step_metrics, step_grads = step_and_gradients(state, micro_batches)
    metrics.append({k: float(v) for k, v in step_metrics.items()})
    grads.append(step_grads)
  return metrics, grads


def assert_close(got, want):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE,
                               err_msg=jax.tree_util.keystr(path))


def assert_same_training(got, want, unstack=None):
  """Same loss, accuracy and gradient norm at every step, and the same gradients.

  (Not the parameters themselves: a few gradients are zero in exact arithmetic, e.g. those of
  the key biases, which shift every score of a query alike; Adam divides their rounding noise
  by its own size, so those parameters wander by up to the learning rate in any run.)
  """
  metrics, grads = got
  for got_metrics, want_metrics in zip(metrics, want[0]):
    for key in ("loss", "grad_norm", "accuracy"):
      np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=TOLERANCE)
  if unstack is not None:
    grads = [unstack(g) for g in grads]
  assert_close(grads, want[1])


@pytest.fixture(scope="module")
def unrolled_params():
  return state_lib.init_params(config(0.0), jax.random.key(1))


@pytest.fixture(scope="module")
def baseline_with_dropout(unrolled_params):
  return train(config(0.1), unrolled_params)


@pytest.fixture(scope="module")
def baseline_without_dropout(unrolled_params):
  return train(config(0.0), unrolled_params)


def test_remat_keeps_the_training_run(unrolled_params, baseline_with_dropout):
  # Dropout on: the recomputed forward pass of a layer redraws exactly the same masks.
  got = train(config(0.1, remat="dots"), unrolled_params)
  assert_same_training(got, baseline_with_dropout)


def test_scan_with_remat_keeps_the_training_run(unrolled_params, baseline_without_dropout):
  # Dropout off: nn.scan derives each layer's dropout key differently (see the model tests).
  # ('none' and 'dots' with and without scan are compared in tests/model/test_scan_remat.py.)
  num_layers = config(0.0).model.num_layers
  got = train(config(0.0, scan_layers=True, remat="full"), stack_layers(unrolled_params,
                                                                         num_layers))
  assert_same_training(got, baseline_without_dropout,
                       unstack=lambda tree: unstack_layers(tree, num_layers))


def test_a_different_run_is_detected(unrolled_params, baseline_with_dropout,
                                     baseline_without_dropout):
  """The comparisons above can fail: dropout alone moves the run well past the tolerance."""
  with pytest.raises(AssertionError):
    assert_same_training(baseline_with_dropout, baseline_without_dropout)


# Threefry-2x32, 20 rounds: (key, counter) -> output, from the Random123 distribution's
# known-answer tests (kat_vectors), as JAX's own tests use them.
THREEFRY_VECTORS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6b200159, 0x99ba4efe)),
    ((0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
    ((0x13198a2e, 0x03707344), (0x243f6a88, 0x85a308d3), (0xc4923a9c, 0x483df7a0)),
]


def test_unrolled_threefry_is_in_effect_and_draws_the_reference_bits():
  assert jax_internals.use_unrolled_threefry_on_cpu()
  hash_fn = jax.jit(jax.extend.random.threefry_2x32)
  n = jax_internals.UNROLL_MIN_ELEMENTS  # Counter pairs: (count[i], count[n + i]).
  for key, (count0, count1), (out0, out1) in THREEFRY_VECTORS:
    key = jnp.asarray(key, jnp.uint32)
    count = jnp.asarray([count0] * n + [count1] * n, jnp.uint32)
    expected = np.asarray([out0] * n + [out1] * n, np.uint32)
    np.testing.assert_array_equal(np.asarray(hash_fn(key, count)), expected)
    if jax.devices()[0].platform == "cpu":  # JAX's own CPU lowering is a 5-iteration loop.
      assert " while(" not in hash_fn.lower(key, count).compile().as_text()


# --- Attention kernels. -----------------------------------------------------------------------

def test_einsum_attention_matches_jax_dot_product_attention():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 6, 2, 8)), jnp.float32) for _ in range(3))
  ids = jnp.asarray([[5, 6, 7, 3, 0, 0], [5, 3, 0, 0, 0, 0], [5, 6, 7, 8, 9, 3]])
  segments = jnp.asarray([[1, 1, 2, 2, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 2, 2, 2]])
  mask = attention.decoder_self_mask(ids, segments)  # padding, causal and packing.
  weights = attention.attention_weights(q, k, mask)
  ours = jnp.einsum("bhts,bshk->bthk", weights, v)
  theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  real = np.asarray(ids != 0)  # Queries with something to attend to.
  np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(theirs)[real], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("kernel,backend,dtype,depth,fused", [
    ("auto", "cpu", jnp.bfloat16, 64, False),
    ("auto", "gpu", jnp.float32, 64, False),     # cuDNN's kernel takes 16-bit floats only.
    ("auto", "gpu", jnp.bfloat16, 64, True),
    ("auto", "gpu", jnp.float16, 128, True),
    ("auto", "gpu", jnp.bfloat16, 60, False),    # head size not a multiple of 8.
    ("auto", "gpu", jnp.bfloat16, 256, False),   # head size over 128.
    ("xla", "gpu", jnp.bfloat16, 64, False),
    ("cudnn", "cpu", jnp.float32, 64, True),     # asked for: cuDNN itself then refuses.
])
def test_auto_uses_the_fused_kernel_only_where_it_runs(monkeypatch, kernel, backend, dtype,
                                                       depth, fused):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  model = ml_collections.ConfigDict({"attention_kernel": kernel})
  query = jax.ShapeDtypeStruct((2, 4, 2, depth), dtype)
  assert attention.use_fused_kernel(model, query) == fused


def test_the_model_runs_the_chosen_kernel(monkeypatch):
  """With 'cudnn' the model calls jax.nn.dot_product_attention(implementation='cudnn') for
  its teacher-forced attention; with 'xla' (or 'auto' on CPU), never."""
  calls = []
  original = jax.nn.dot_product_attention

  def recording(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return original(*args, implementation="xla", **kwargs)  # (No cuDNN here.)

  monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
  ids = jnp.asarray([[5, 6, 3, 0]])
  for kernel, expected in (("auto", 0), ("xla", 0), ("cudnn", 6)):  # N=2: 6 attentions.
    cfg = config(0.0, attention_kernel=kernel).model
    model = Transformer(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
    calls.clear()
    jax.eval_shape(lambda p: model.apply({"params": p}, ids, ids), params)
    assert calls == ["cudnn"] * expected


def test_cudnn_refusal_is_a_config_error_for_cudnn_and_a_fallback_for_auto(monkeypatch):
  def refusing(*args, implementation=None, **kwargs):
    raise RuntimeError("cuDNN is not available")  # What jax raises without a usable cuDNN.

  monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  ids = jnp.asarray([[5, 6, 3, 0]])
  model = Transformer(config(0.0, attention_kernel="cudnn").model)
  with pytest.raises(ConfigError, match="attention_kernel"):
    jax.eval_shape(model.init, jax.random.key(0), ids, ids)
  model = Transformer(config(0.0, attention_kernel="auto", dtype="bfloat16").model)
  jax.eval_shape(model.init, jax.random.key(0), ids, ids)  # The einsums instead.
