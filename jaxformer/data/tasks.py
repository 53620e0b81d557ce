"""Generated tasks: number words (English -> Spanish) and tensor2tensor's algorithmic tasks.

Each task is a function `sample(rng, lengths) -> (source, target)` that draws one random pair.
`generate_splits` draws the train, validation and test splits from one seed, never giving two
splits (or two examples) the same source, so that evaluation measures generalisation.

The default task, 'numbers', is a small translation problem a learner recognises:

  "three thousand four hundred twenty-one"  ->  "tres mil cuatrocientos veintiuno"

It cannot be solved by copying: the vocabularies differ, the word order changes ("twenty-one"
-> "veintiuno" is one word; "thirty-one" -> "treinta y uno" is three) and Spanish has irregular
forms ("quinientos", "cien" but "ciento uno", "veintiún mil"). Lengths vary from one word to a
dozen, so padding and masks matter. 'numbers_es_en' is the same task the other way round
(Spanish -> English): a changed task over the same words, to fine-tune a 'numbers' model on.

The algorithmic tasks (copy, reverse, sort, addition) use the digits 0-9 as symbols, written
with spaces between them ("3 1 4"), so every symbol is one token of the vocabulary. Their input
length per split is configurable, so a test split can hold longer inputs than training.
"""

from __future__ import annotations

import random
from typing import Callable

from jaxformer.errors import ConfigError

Pair = tuple[str, str]
Sampler = Callable[[random.Random, tuple[int, int]], Pair]

MAX_NUMBER = 999_999       # the 'numbers' task draws from 0..MAX_NUMBER.
MAX_NUMBER_DIGITS = len(str(MAX_NUMBER))
SYMBOLS = "0123456789"     # the alphabet of the algorithmic tasks.
ATTEMPTS_PER_EXAMPLE = 20  # draws allowed per requested example before giving up on uniqueness.


# --- Number words. -------------------------------------------------------------------------

_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
            "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _english_below_thousand(n: int) -> str:
  """1 <= n <= 999 in words: 'four hundred twenty-one'."""
  hundreds, rest = divmod(n, 100)
  words = [f"{_EN_ONES[hundreds]} hundred"] if hundreds else []
  if rest >= 20:
    tens, ones = divmod(rest, 10)
    words.append(_EN_TENS[tens] + (f"-{_EN_ONES[ones]}" if ones else ""))
  elif rest:
    words.append(_EN_ONES[rest])
  return " ".join(words)


def english_number(n: int) -> str:
  """0 <= n <= 999,999 in American English words, without 'and'.

  >>> english_number(3421)
  'three thousand four hundred twenty-one'
  """
  if not 0 <= n <= MAX_NUMBER:
    raise ValueError(f"{n} is outside 0..{MAX_NUMBER}")
  if n == 0:
    return "zero"
  thousands, rest = divmod(n, 1000)
  words = [f"{_english_below_thousand(thousands)} thousand"] if thousands else []
  if rest:
    words.append(_english_below_thousand(rest))
  return " ".join(words)


# 0..29 are single words in Spanish; note the accents of dieciséis, veintidós, veintitrés and
# veintiséis.
_ES_BELOW_30 = (
    "cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce quince "
    "dieciséis diecisiete dieciocho diecinueve veinte veintiuno veintidós veintitrés "
    "veinticuatro veinticinco veintiséis veintisiete veintiocho veintinueve").split()
_ES_TENS = "_ _ _ treinta cuarenta cincuenta sesenta setenta ochenta noventa".split()
# 100 alone is "cien"; 101..199 use "ciento". Note the irregular quinientos, setecientos,
# novecientos.
_ES_HUNDREDS = ("_ ciento doscientos trescientos cuatrocientos quinientos seiscientos "
                "setecientos ochocientos novecientos").split()


def _spanish_below_hundred(n: int) -> str:
  """1 <= n <= 99: 'veintiuno', 'treinta y uno'."""
  if n < 30:
    return _ES_BELOW_30[n]
  tens, ones = divmod(n, 10)
  return _ES_TENS[tens] + (f" y {_ES_BELOW_30[ones]}" if ones else "")


def _spanish_below_thousand(n: int) -> str:
  """1 <= n <= 999: 'cien', 'ciento uno', 'quinientos veintidós'."""
  if n == 100:
    return "cien"
  hundreds, rest = divmod(n, 100)
  words = [_ES_HUNDREDS[hundreds]] if hundreds else []
  if rest:
    words.append(_spanish_below_hundred(rest))
  return " ".join(words)


def _apocopate(words: str) -> str:
  """'uno' becomes 'un' before a noun such as 'mil': 'veintiún mil', 'treinta y un mil'."""
  if words.endswith("veintiuno"):
    return words[:-len("veintiuno")] + "veintiún"
  if words == "uno" or words.endswith(" uno"):
    return words[:-len("uno")] + "un"
  return words


def spanish_number(n: int) -> str:
  """0 <= n <= 999,999 in Spanish words.

  >>> spanish_number(3421)
  'tres mil cuatrocientos veintiuno'
  """
  if not 0 <= n <= MAX_NUMBER:
    raise ValueError(f"{n} is outside 0..{MAX_NUMBER}")
  if n == 0:
    return "cero"
  thousands, rest = divmod(n, 1000)
  words = []
  if thousands == 1:
    words.append("mil")  # 1000 is "mil", never "un mil".
  elif thousands:
    words.append(_apocopate(_spanish_below_thousand(thousands)) + " mil")
  if rest:
    words.append(_spanish_below_thousand(rest))
  return " ".join(words)


# --- Samplers: one random pair per call. ---------------------------------------------------

def _random_digits(rng: random.Random, length: int) -> list[str]:
  return [rng.choice(SYMBOLS) for _ in range(length)]


def _random_length(rng: random.Random, lengths: tuple[int, int]) -> int:
  low, high = lengths
  return rng.randint(low, high)


def _random_number(rng: random.Random, num_digits: int) -> int:
  """A number with exactly `num_digits` digits (0..9 when num_digits == 1)."""
  low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
  return rng.randint(low, 10 ** num_digits - 1)


def sample_numbers(rng: random.Random, lengths: tuple[int, int]) -> Pair:
  """English words -> Spanish words. The digit count is uniform in 1..6 (so short numbers are
  common); `lengths` is not used."""
  del lengths
  n = _random_number(rng, rng.randint(1, MAX_NUMBER_DIGITS))
  return english_number(n), spanish_number(n)


def sample_numbers_es_en(rng: random.Random, lengths: tuple[int, int]) -> Pair:
  """Spanish words -> English words: 'numbers' the other way round. Its pairs use the words of
  'numbers', so a model trained there can be fine-tuned here with the same vocabulary."""
  english, spanish = sample_numbers(rng, lengths)
  return spanish, english


def sample_copy(rng: random.Random, lengths: tuple[int, int]) -> Pair:
  """'3 1 4' -> '3 1 4'."""
  symbols = " ".join(_random_digits(rng, _random_length(rng, lengths)))
  return symbols, symbols


def sample_reverse(rng: random.Random, lengths: tuple[int, int]) -> Pair:
  """'3 1 4' -> '4 1 3'."""
  symbols = _random_digits(rng, _random_length(rng, lengths))
  return " ".join(symbols), " ".join(reversed(symbols))


def sample_sort(rng: random.Random, lengths: tuple[int, int]) -> Pair:
  """'3 1 4 1' -> '1 1 3 4'."""
  symbols = _random_digits(rng, _random_length(rng, lengths))
  return " ".join(symbols), " ".join(sorted(symbols))


def sample_addition(rng: random.Random, lengths: tuple[int, int]) -> Pair:
  """'1 2 3 + 4 5' -> '1 6 8'. `lengths` bounds the digits of each operand."""
  a = _random_number(rng, _random_length(rng, lengths))
  b = _random_number(rng, _random_length(rng, lengths))
  return f"{' '.join(str(a))} + {' '.join(str(b))}", " ".join(str(a + b))


SAMPLERS: dict[str, Sampler] = {
    "numbers": sample_numbers,
    "numbers_es_en": sample_numbers_es_en,
    "copy": sample_copy,
    "reverse": sample_reverse,
    "sort": sample_sort,
    "addition": sample_addition,
}
ALGORITHMIC_TASKS = ("copy", "reverse", "sort", "addition")


def generate_splits(task: str, sizes: dict[str, int], lengths: dict[str, tuple[int, int]],
                    seed: int) -> dict[str, list[Pair]]:
  """Draws every split of a generated task, in the order of `sizes`, from one seed.

  No source appears twice, within a split or across splits: a pair whose source was already
  drawn is drawn again. Raises ConfigError when the task cannot supply that many distinct
  sources (e.g. 1000 copy examples of length 1..2 from 10 symbols).

  Args:
    task: a key of SAMPLERS.
    sizes: examples per split, e.g. {'train': 20000, 'validation': 1000, 'test': 1000}.
    lengths: (min, max) input length per split (algorithmic tasks).
    seed: the same seed gives the same splits.
  """
  sample = SAMPLERS[task]
  rng = random.Random(seed)
  seen: set[str] = set()
  splits = {}
  for split, size in sizes.items():
    pairs = []
    for _ in range(ATTEMPTS_PER_EXAMPLE * size + 100):
      if len(pairs) == size:
        break
      source, target = sample(rng, lengths[split])
      if source not in seen:
        seen.add(source)
        pairs.append((source, target))
    if len(pairs) < size:
      raise ConfigError(
          f"task {task!r} could only draw {len(pairs)} distinct {split} examples of the "
          f"{size} asked for (lengths {lengths[split]}); lower data.num_{split} or widen "
          "data.train_lengths / data.eval_lengths")
    splits[split] = pairs
  return splits
