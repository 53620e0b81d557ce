"""The google/flax WMT example's Transformer on the peers' training workloads: a throughput peer.

github.com/google/flax's examples/wmt is the reference JAX/Flax (linen) translation Transformer.
This script trains it on ../shared/peers/torch_peers.py's workloads ('small': vocabulary 8000,
d_model 256, 4 heads, d_ff 1024, 3 + 3 layers, batch 64 x 32/32 tokens; 'base': vocabulary
32000, d_model 512, 8 heads, d_ff 2048, 6 + 6 layers, batch 16 x 64/64 tokens; taken from that
file, with its FLOP formula) and prints one JSON line in torch_peers.py's train format (system
"flax_wmt"): target tokens/s of the median step, step seconds, load average, model GFLOPs.

Nothing of the example is copied here: `--example-dir` names a checkout of examples/wmt, and the
script imports the example's own modules from it. Tested with flax commit
18f8f311c275d57f46d95e41b15aa97b454754c0 (2026-07-02; examples/wmt is still flax.linen there)
under jax 0.10.2, flax 0.12.8, optax 0.2.8:

  git clone https://github.com/google/flax /tmp/flax && git -C /tmp/flax checkout 18f8f311c275
  .venv/bin/python benchmarks/peer_flax_wmt.py --example-dir /tmp/flax/examples/wmt --workload small
  .venv/bin/python benchmarks/peer_flax_wmt.py --example-dir /tmp/flax/examples/wmt --workload base

What runs is the example's: models.Transformer, and train.py's `train_step` (its label-smoothed,
weighted cross entropy, its metrics, Adam's update through its `TrainState`), the learning-rate
schedule of `create_learning_rate_schedule`, and configs/default.py's settings (dropout and
attention dropout 0.1, label smoothing 0.1, shared embeddings and logits through the embedding
matrix, fixed sinusoidal positions, learning rate 0.002 with 1000 warmup steps, `preferred_dtype`:
float32 on CPU) with only the sizes changed to the workload's: vocab_size, emb_dim = qkv_dim =
d_model, mlp_dim = d_ff, num_heads, num_layers, per_device_batch_size = batch. The model's
TransformerConfig and the optimizer are made as train_and_evaluate makes them (optax.adamw, b1
0.9, b2 0.98, eps 1e-9, the config's weight decay 0): that function is the training loop itself
(TFDS data, checkpoints, evaluation), so it cannot be imported for one step.

train.py imports TensorFlow, clu and the tf.data input pipeline for that loop alone; empty
stand-ins for those three take their place in sys.modules (`stub_input_modules`), so jaxformer's
virtualenv (no TensorFlow, no clu) runs it, and TensorFlow never loads in the timed process.

The example pmaps its step over the local devices (axis "batch"); here it runs once, on one
device, as jit(shard_map) over a one-device mesh with that axis name (what jax.pmap now compiles
to), with the state donated as the example donates it. The step is compiled ahead of time and
the compile is reported apart (`compile_s`); each timed step ends with block_until_ready.
Tokens per step are the example's own loss weights (targets > 0): every target token is real
here, as in the peers' workloads (random ids from 3 up, no padding).

The model differs from torch_peers.py's by the example's design, not by choice here: pre-layer-
norm blocks with a final norm, attention projections without biases, embeddings not scaled by
sqrt(d_model) (the logits are divided by it instead), padding and causal masks always built, and
label smoothing 0.1 in the loss (torch_peers: plain cross entropy, Adam at 1e-4).
"""

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types

import numpy as np

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "peers")
FLAX_COMMIT = "18f8f311c275d57f46d95e41b15aa97b454754c0"
FIRST_REAL_ID = 3  # torch_peers.make_batches: ids 0-2 are PAD, BOS, EOS


def log(*parts):
  print(*parts, file=sys.stderr, flush=True)


def stub_input_modules():
  """Stand-ins for the input-pipeline modules that the example's train.py imports.

  train.py imports tensorflow, clu (metric_writers, periodic_actions) and input_pipeline (tf.data
  and TFDS) for train_and_evaluate, the training loop, which is not used here; train_step, the
  loss and TrainState need none of them. `tf.data.Dataset` is read by two annotations at import
  time, so the stand-in carries that name. flax's own modules are imported first, so flax.io
  (which looks for tensorflow with importlib) sees the real environment, not the stand-in.
  """
  importlib.import_module("flax.training.checkpoints")  # before the stand-ins: see above
  tensorflow = types.ModuleType("tensorflow")
  tensorflow.data = types.SimpleNamespace(Dataset=object)
  clu = types.ModuleType("clu")
  for name in ("metric_writers", "periodic_actions"):
    module = types.ModuleType(f"clu.{name}")
    setattr(clu, name, module)
    sys.modules[module.__name__] = module
  sys.modules["clu"] = clu
  sys.modules["tensorflow"] = tensorflow
  sys.modules["input_pipeline"] = types.ModuleType("input_pipeline")


def load_example(example_dir: str):
  """The example's models and train modules, and its default config."""
  example_dir = os.path.abspath(example_dir)
  if not os.path.isfile(os.path.join(example_dir, "models.py")):
    raise SystemExit(f"--example-dir {example_dir}: no models.py (want flax's examples/wmt)")
  stub_input_modules()
  sys.path.insert(0, example_dir)
  import models
  import train
  spec = importlib.util.spec_from_file_location(
      "wmt_default_config", os.path.join(example_dir, "configs", "default.py"))
  default = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(default)
  return models, train, default.get_config()


def workload_config(config, w: dict):
  """The example's default config with the workload's sizes."""
  config.vocab_size = w["vocab"]
  config.emb_dim = config.qkv_dim = w["d_model"]
  config.mlp_dim = w["d_ff"]
  config.num_heads = w["heads"]
  config.num_layers = w["layers"]
  config.per_device_batch_size = w["batch"]
  return config


def build(models, train, config, w: dict):
  """(state, jitted step, model config, dtype), made the way train_and_evaluate makes them."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import Mesh, PartitionSpec

  dtype = train.preferred_dtype(config)
  # kernel_init and bias_init: TransformerConfig's defaults are what train_and_evaluate passes.
  train_config = models.TransformerConfig(
      vocab_size=config.vocab_size, output_vocab_size=config.vocab_size,
      share_embeddings=config.share_embeddings, logits_via_embedding=config.logits_via_embedding,
      dtype=dtype, emb_dim=config.emb_dim, num_heads=config.num_heads,
      num_layers=config.num_layers, qkv_dim=config.qkv_dim, mlp_dim=config.mlp_dim,
      max_len=max(config.max_target_length, config.max_eval_target_length),
      dropout_rate=config.dropout_rate, attention_dropout_rate=config.attention_dropout_rate,
      deterministic=False, decode=False)
  rng = jax.random.key(config.seed)
  rng, init_rng = jax.random.split(rng)
  model = models.Transformer(train_config.replace(deterministic=True))
  variables = jax.jit(model.init)(init_rng, jnp.ones((w["batch"], w["src_len"]), jnp.float32),
                                  jnp.ones((w["batch"], w["tgt_len"]), jnp.float32))
  learning_rate_fn = train.create_learning_rate_schedule(
      learning_rate=config.learning_rate, warmup_steps=config.warmup_steps)
  dynamic_scale = train.dynamic_scale_lib.DynamicScale() if dtype == jnp.float16 else None
  state = train.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      tx=optax.adamw(learning_rate=learning_rate_fn, b1=0.9, b2=0.98, eps=1e-9,
                     weight_decay=config.weight_decay),
      dynamic_scale=dynamic_scale)
  step_fn = functools.partial(train.train_step, config=train_config,
                              learning_rate_fn=learning_rate_fn,
                              label_smoothing=config.label_smoothing)
  mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
  sharded = jax.shard_map(lambda s, batch, key: step_fn(s, batch, dropout_rng=key), mesh=mesh,
                          in_specs=PartitionSpec(), out_specs=PartitionSpec())
  step = jax.jit(sharded, donate_argnums=0)
  dropout_rng = rng  # like the example: one key, folded with the step inside train_step
  return state, step, dropout_rng, dtype


def make_batches(w: dict, n: int = 4, seed: int = 0) -> list[dict]:
  """`n` batches of random real ids, as torch_peers.make_batches draws them (numpy here)."""
  rng = np.random.default_rng(seed)
  return [dict(inputs=rng.integers(FIRST_REAL_ID, w["vocab"], (w["batch"], w["src_len"]),
                                   dtype=np.int32),
               targets=rng.integers(FIRST_REAL_ID, w["vocab"], (w["batch"], w["tgt_len"]),
                                    dtype=np.int32))
          for _ in range(n)]


def env_info(jax) -> dict:
  import flax
  import optax
  return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "backend": jax.default_backend(), "device": str(jax.devices()[0]),
          "python": platform.python_version(), "cpus": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def train_workload(args, w: dict, peers) -> dict:
  models, train, config = load_example(args.example_dir)
  import jax
  config = workload_config(config, w)
  state, step, dropout_rng, dtype = build(models, train, config, w)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  batches = [jax.device_put(b) for b in make_batches(w)]

  start = time.perf_counter()
  compiled = step.lower(state, batches[0], dropout_rng).compile()
  compile_s = time.perf_counter() - start
  log(f"[flax_wmt/{w['name']}] compiled in {compile_s:.1f}s, {n_params} parameters, "
      f"{np.dtype(dtype).name}")

  load_start = os.getloadavg()
  times, cpus, losses = [], [], []
  cpu_start = time.process_time()
  for i in range(args.warmup + args.steps):
    c0 = time.process_time()
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[i % len(batches)], dropout_rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
    denominator = float(metrics["denominator"])
    losses.append(float(metrics["loss"]) / denominator)
    log(f"[flax_wmt/{w['name']}] step {i} {times[-1]:.3f}s loss {losses[-1]:.3f}")
  cpu = time.process_time() - cpu_start
  tokens = w["batch"] * w["tgt_len"]
  assert denominator == tokens, (denominator, tokens)  # the example's weights: all real tokens
  timed = times[args.warmup:]
  median = statistics.median(timed)
  flops = peers.model_flops(w)
  return dict(
      kind="train", system="flax_wmt", workload=w["name"],
      tokens_per_step=tokens, tokens_per_s=tokens / median,
      step_s_median=median, step_s_min=min(timed), step_s_max=max(timed),
      first_step_s=times[0], second_step_s=times[1] if len(times) > 1 else None,
      compile_s=compile_s, warmup=args.warmup, timed_steps=args.steps,
      gflop_per_step=flops / 1e9,
      gflop_per_step_excl_logits=peers.model_flops(w, exclude_logits=True) / 1e9,
      achieved_gflops=flops / median / 1e9,
      n_params=n_params, loss_first=losses[0], loss_last=losses[-1],
      cpu_util=cpu / sum(times), step_cpu_s_median=statistics.median(cpus[args.warmup:]),
      loadavg_start=load_start, loadavg_end=os.getloadavg(),
      dtype=np.dtype(dtype).name, flax_commit=args.flax_commit,
      example_dir=os.path.abspath(args.example_dir), **env_info(jax))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--example-dir", required=True,
                      help="flax's examples/wmt directory (models.py, train.py, configs/)")
  parser.add_argument("--workload", choices=["small", "base"], default="small")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=20,
                      help="timed training steps (median is reported)")
  parser.add_argument("--peers-dir", default=PEERS,
                      help="where torch_peers.py is (its WORKLOADS and model_flops)")
  parser.add_argument("--flax-commit", default=FLAX_COMMIT,
                      help="the flax commit of --example-dir, recorded in the JSON line")
  args = parser.parse_args()
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be at least 1 and --warmup at least 0")
  sys.path.insert(0, os.path.abspath(args.peers_dir))
  import torch_peers  # standard library only at import time; torch is imported in its main()
  w = dict(torch_peers.WORKLOADS[args.workload], name=args.workload)
  print(json.dumps(train_workload(args, w, torch_peers)), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
