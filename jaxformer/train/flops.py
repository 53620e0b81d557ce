"""How much arithmetic one training step is: the model FLOP count behind MFU.

Counted as the usual "model FLOPs" (MaxText, PaLM appendix B): 2 FLOPs per multiply-add of
every matrix product in the forward pass, attention scores and their weighted sums included,
and a backward pass costing twice the forward (3x in all). Element-wise work (softmax, LayerNorm,
activations, dropout) is left out, and so is rematerialisation: MFU measures useful work.

For one sequence pair of S source and T target tokens (D = d_model, F = d_ff, V = vocab):
- encoder layer, per source token: Q, K, V and output projections 4 * 2*D*D; scores QK^T and
  the weighted sum of values 2 * 2*S*D; feed-forward 2 * 2*D*F.
- decoder layer, per target token: self-attention as the encoder's with T for S; cross-attention
  queries and output 2 * 2*D*D, scores and weighted sum 2 * 2*S*D; feed-forward 2 * 2*D*F;
  plus the cross-attention keys and values of each source token, 2 * 2*D*D per source token.
- the output projection, per target token: 2*D*V.
Attention over padding and the causal mask's unused half are counted as computed (they are).
"""

from __future__ import annotations

TRAIN_FACTOR = 3  # forward + backward (gradients w.r.t. activations and weights).


def encoder_layer_flops(d_model: int, d_ff: int, src_len: int) -> int:
  """Forward FLOPs of one encoder layer over one source sequence of `src_len` tokens."""
  per_token = 4 * 2 * d_model * d_model + 2 * 2 * src_len * d_model + 2 * 2 * d_model * d_ff
  return src_len * per_token


def decoder_layer_flops(d_model: int, d_ff: int, src_len: int, tgt_len: int) -> int:
  """Forward FLOPs of one decoder layer over one target sequence, attending to one source."""
  self_attention = 4 * 2 * d_model * d_model + 2 * 2 * tgt_len * d_model
  cross_attention = 2 * 2 * d_model * d_model + 2 * 2 * src_len * d_model
  feed_forward = 2 * 2 * d_model * d_ff
  cross_keys_values = src_len * 2 * 2 * d_model * d_model
  return tgt_len * (self_attention + cross_attention + feed_forward) + cross_keys_values


def forward_flops(model_config, src_len: int, tgt_len: int) -> int:
  """Forward FLOPs of the whole Transformer for one (source, target) pair of rows."""
  m = model_config
  encoder = m.num_layers * encoder_layer_flops(m.d_model, m.d_ff, src_len)
  decoder = m.num_layers * decoder_layer_flops(m.d_model, m.d_ff, src_len, tgt_len)
  output = tgt_len * 2 * m.d_model * m.vocab_size
  return encoder + decoder + output


def train_step_flops(config, batch_size: int | None = None) -> int:
  """FLOPs of one training step on a global batch of rows of data.max_len tokens."""
  batch_size = config.train.batch_size if batch_size is None else batch_size
  length = config.data.max_len
  return TRAIN_FACTOR * batch_size * forward_flops(config.model, length, length)
