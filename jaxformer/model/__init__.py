"""The Transformer of Vaswani et al. 2017, in flax linen.

embedding.py    token embeddings (scaled by sqrt(D), tied output) and positional encodings
attention.py    masks, multi-head attention, the key/value cache for decoding
transformer.py  feed-forward, encoder and decoder layers and stacks, `Transformer`
"""
