"""The generated tasks: number words checked against grammar, algorithmic pairs recomputed."""

import random

import pytest

from jaxformer.data import tasks
from jaxformer.errors import ConfigError

# Written from Spanish grammar (RAE), not from the code: apocope before "mil", cien vs ciento,
# the irregular hundreds and the accented forms of 16, 22, 23, 26.
SPANISH = {
    0: "cero", 1: "uno", 15: "quince", 16: "dieciséis", 20: "veinte", 21: "veintiuno",
    22: "veintidós", 23: "veintitrés", 26: "veintiséis", 30: "treinta", 31: "treinta y uno",
    99: "noventa y nueve", 100: "cien", 101: "ciento uno", 110: "ciento diez",
    200: "doscientos", 500: "quinientos", 555: "quinientos cincuenta y cinco",
    700: "setecientos", 900: "novecientos", 1000: "mil", 1001: "mil uno", 2000: "dos mil",
    3421: "tres mil cuatrocientos veintiuno", 21000: "veintiún mil", 31000: "treinta y un mil",
    41001: "cuarenta y un mil uno", 100000: "cien mil", 100100: "cien mil cien",
    101000: "ciento un mil", 121000: "ciento veintiún mil", 500000: "quinientos mil",
    999999: "novecientos noventa y nueve mil novecientos noventa y nueve",
}
ENGLISH = {
    0: "zero", 13: "thirteen", 40: "forty", 42: "forty-two", 100: "one hundred",
    115: "one hundred fifteen", 3421: "three thousand four hundred twenty-one",
    100000: "one hundred thousand", 999999: "nine hundred ninety-nine thousand nine hundred "
    "ninety-nine",
}


@pytest.mark.parametrize("n,words", sorted(SPANISH.items()))
def test_spanish_number_words(n, words):
  assert tasks.spanish_number(n) == words


@pytest.mark.parametrize("n,words", sorted(ENGLISH.items()))
def test_english_number_words(n, words):
  assert tasks.english_number(n) == words


# Independent readers of the words back into numbers.
_EN_VALUES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_EN_VALUES.update({w: 10 * i for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)})


def read_english(text):
  total, current = 0, 0
  for word in text.split():
    if word == "hundred":
      current *= 100
    elif word == "thousand":
      total, current = total + current * 1000, 0
    else:
      current += sum(_EN_VALUES[part] for part in word.split("-"))
  return total + current


_ES_VALUES = {
    "cero": 0, "un": 1, "uno": 1, "dos": 2, "tres": 3, "cuatro": 4, "cinco": 5, "seis": 6,
    "siete": 7, "ocho": 8, "nueve": 9, "diez": 10, "once": 11, "doce": 12, "trece": 13,
    "catorce": 14, "quince": 15, "dieciséis": 16, "diecisiete": 17, "dieciocho": 18,
    "diecinueve": 19, "veinte": 20, "veintiún": 21, "veintiuno": 21, "veintidós": 22,
    "veintitrés": 23, "veinticuatro": 24, "veinticinco": 25, "veintiséis": 26,
    "veintisiete": 27, "veintiocho": 28, "veintinueve": 29, "treinta": 30, "cuarenta": 40,
    "cincuenta": 50, "sesenta": 60, "setenta": 70, "ochenta": 80, "noventa": 90, "cien": 100,
    "ciento": 100, "doscientos": 200, "trescientos": 300, "cuatrocientos": 400,
    "quinientos": 500, "seiscientos": 600, "setecientos": 700, "ochocientos": 800,
    "novecientos": 900}


def read_spanish(text):
  total, current = 0, 0
  for word in text.split():
    if word == "mil":
      total, current = total + max(current, 1) * 1000, 0
    elif word != "y":
      current += _ES_VALUES[word]
  return total + current


def test_number_words_read_back_for_random_numbers():
  rng = random.Random(0)
  numbers = [rng.randint(0, tasks.MAX_NUMBER) for _ in range(3000)] + list(range(1100))
  for n in numbers:
    assert read_english(tasks.english_number(n)) == n
    spanish = tasks.spanish_number(n)
    assert read_spanish(spanish) == n
    # "un" / "veintiún" right before "mil", and only there; "uno" / "veintiuno" never there.
    words = spanish.split()
    for word, after in zip(words, words[1:] + [""]):
      if word in ("un", "veintiún"):
        assert after == "mil", spanish
      if word in ("uno", "veintiuno"):
        assert after != "mil", spanish


def test_numbers_es_en_is_numbers_the_other_way_round():
  """Spanish words -> the English words of the same number (read back, not recomputed)."""
  splits = tasks.generate_splits("numbers_es_en", {"train": 500}, {"train": (1, 8)}, seed=0)
  for source, target in splits["train"]:
    assert read_spanish(source) == read_english(target)
  # The same draws as 'numbers', each pair turned round: the same words, the same vocabulary.
  numbers = tasks.generate_splits("numbers", {"train": 500}, {"train": (1, 8)}, seed=0)
  assert [(t, s) for s, t in splits["train"]] == numbers["train"]


SIZES = {"train": 300, "validation": 40, "test": 40}


@pytest.mark.parametrize("task", sorted(tasks.SAMPLERS))
def test_splits_are_deterministic_distinct_and_disjoint(task):
  lengths = {"train": (1, 4), "validation": (1, 4), "test": (5, 6)}
  splits = tasks.generate_splits(task, SIZES, lengths, seed=3)
  assert splits == tasks.generate_splits(task, SIZES, lengths, seed=3)
  assert splits != tasks.generate_splits(task, SIZES, lengths, seed=4)
  assert {s: len(p) for s, p in splits.items()} == SIZES
  all_sources = [source for pairs in splits.values() for source, _ in pairs]
  assert len(set(all_sources)) == len(all_sources)


def test_algorithmic_targets_are_right_and_lengths_in_range():
  lengths = {"train": (2, 4), "validation": (2, 4), "test": (6, 7)}
  for task in tasks.ALGORITHMIC_TASKS:
    splits = tasks.generate_splits(task, SIZES, lengths, seed=0)
    for split, pairs in splits.items():
      low, high = lengths[split]
      for source, target in pairs:
        if task == "addition":
          a, b = source.split(" + ")
          a, b = a.replace(" ", ""), b.replace(" ", "")
          assert low <= len(a) <= high and low <= len(b) <= high
          assert int(target.replace(" ", "")) == int(a) + int(b)
          continue
        symbols = source.split()
        assert low <= len(symbols) <= high
        expected = {"copy": symbols, "reverse": symbols[::-1], "sort": sorted(symbols)}[task]
        assert target.split() == expected


def test_too_many_examples_for_the_lengths_is_a_config_error():
  # Copy of length 1..2 over 10 symbols has 110 distinct sources.
  with pytest.raises(ConfigError, match=r"could only draw \d+ distinct train examples"):
    tasks.generate_splits("copy", {"train": 200}, {"train": (1, 2)}, seed=0)
