"""SentencePiece vocabulary: train once per workdir, load, encode and decode.

The ids of the special tokens are defined here and nowhere else.
"""

PAD_ID = 0  # padding; never a real token. Masks and loss weights are `ids != PAD_ID`.
UNK_ID = 1  # a piece the vocabulary does not know.
BOS_ID = 2  # start of a target sequence: the decoder's first input (teacher forcing, decoding).
EOS_ID = 3  # end of a sequence: appended to every source and target.
