"""Hugging Face MarianMT trained on length-bucketed batches: the peer of jaxformer's packed rows.

jaxformer packs pairs into fixed rows (`train_throughput.py --models packed`: 36 rows of 128
tokens, pairs of 10-60 tokens a side). Transformers users batch by length instead: pairs of
similar length together, each batch padded to its longest pair. This script trains the peers'
small MarianMT (../shared/peers/torch_peers.py's `build_hf_model`, vocabulary 8000, d_model
256, 3 + 3 layers, dropout 0.1, Adam) on such batches, each holding about as many real target
tokens as a packed batch (`--tokens`, default 3614: the real target tokens of the packed batch,
`target_tokens` in train_throughput.py's JSON), and prints one JSON line: real target tokens/s,
the figure to set beside jaxformer's.

It needs torch and transformers, in a virtualenv of their own (never jaxformer's):

  /tmp/peers/bin/python benchmarks/peer_packed_hf.py [--tokens 3614] [--steps 12]
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "peers")
LENGTHS = (10, 60)  # tokens a side, EOS included: what benchmarks/common.packed_rows draws.
FIRST_REAL_ID = 3


def bucketed_batches(rng, vocab: int, tokens: int, count: int, pairs: int = 4000):
  """`count` batches of random pairs sorted by target length, each filled to about `tokens`
  real target tokens; (source [b, S], target [b, T], source mask [b, S]) padded with 0."""
  src_len = rng.integers(LENGTHS[0], LENGTHS[1] + 1, pairs)
  tgt_len = rng.integers(LENGTHS[0], LENGTHS[1] + 1, pairs)
  order = np.argsort(tgt_len, kind="stable")
  starts = rng.choice(pairs // 2, count, replace=False)  # batches from different buckets
  batches = []
  for start in starts:
    rows, total = [], 0
    for i in order[start:]:
      if total + tgt_len[i] > tokens:
        break
      rows.append(i)
      total += int(tgt_len[i])
    s_max, t_max = max(src_len[rows]), max(tgt_len[rows])
    src = np.zeros((len(rows), s_max), np.int64)
    tgt = np.zeros((len(rows), t_max), np.int64)
    for r, i in enumerate(rows):
      src[r, :src_len[i]] = rng.integers(FIRST_REAL_ID, vocab, src_len[i])
      tgt[r, :tgt_len[i]] = rng.integers(FIRST_REAL_ID, vocab, tgt_len[i])
    batches.append((src, tgt, (src != 0).astype(np.int64), total))
  return batches


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=3614)
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  sys.path.insert(0, PEERS)
  import torch
  import torch_peers
  torch.manual_seed(0)
  w = dict(torch_peers.WORKLOADS["small"], name="small")
  model = torch_peers.build_hf_model(w).train()
  optimizer = torch.optim.Adam(model.parameters(), lr=torch_peers.LR)
  batches = bucketed_batches(np.random.default_rng(0), w["vocab"], args.tokens, 4)
  load_start, times, real = os.getloadavg(), [], []
  for i in range(args.warmup + args.steps):
    src, tgt, mask, total = batches[i % len(batches)]
    labels = torch.from_numpy(tgt).masked_fill(torch.from_numpy(tgt) == 0, -100)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=torch.from_numpy(src), attention_mask=torch.from_numpy(mask),
                 labels=labels).loss
    loss.backward()
    optimizer.step()
    loss.item()
    if i >= args.warmup:
      times.append(time.perf_counter() - start)
      real.append(total)
  seconds = sum(times)
  print(json.dumps(dict(
      kind="train", system="hf", workload="length-bucketed", pairs_lengths=LENGTHS,
      target_tokens_per_step=float(statistics.mean(real)), real_target_tokens_per_s=sum(real) / seconds,
      step_s_median=statistics.median(times), steps=args.steps, loadavg_start=load_start,
      loadavg_end=os.getloadavg(), torch=torch.__version__, threads=torch.get_num_threads())))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
