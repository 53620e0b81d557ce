"""The ids of the special tokens, defined once.

Every vocabulary jaxformer trains puts them at these ids (jaxformer.data.tokenizer checks it),
and the model, the loss and decoding rely on them: padding is never a real token, so masks and
loss weights are simply `ids != PAD_ID`.
"""

PAD_ID = 0  # padding; never a real token. Masks and loss weights are `ids != PAD_ID`.
UNK_ID = 1  # a piece the vocabulary does not know.
BOS_ID = 2  # start of a target sequence: the decoder's first input (teacher forcing, decoding).
EOS_ID = 3  # end of a sequence: appended to every source and target.
