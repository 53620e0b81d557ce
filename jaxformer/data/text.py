"""Text as lines: the one way jaxformer splits a file or a stream into lines, and writes them.

`translate` reads its input with it (a file or stdin) and the text datasets read their files
with it (jaxformer.data.sources), so that line i of a source file is line i everywhere: in a
dataset, in the translations, in an error message. Python's `str.splitlines` would not do:
it also breaks at form feed, \\x1c-\\x1e, \\x85 (NEL) and U+2028/U+2029, which may well sit
inside a sentence, and two input lines would give three translations, each one beside the
wrong source from there on. So:

- a line ends at "\\n" only; a "\\r" before it is dropped (files written on Windows);
- a UTF-8 byte-order mark at the very start is dropped (Notepad writes one);
- the newline that ends the last line does not make an extra, empty line;
- bytes that are not UTF-8 are an error naming the line and the byte offset.

`iter_lines` reads a stream one line at a time (its `readline`), so that a file of any size is
read in bounded memory and a line typed at a terminal is there as soon as it ends; `split_lines`
and `read_lines` are the same lines, all at once.

On the way out, `one_line` turns any character that a reader could take for a line break into
a space, so that one translation stays one line for every reader, `splitlines` included.

A leaf of the data room: it imports neither tfds nor jax, so `translate` reads its input
without loading the dataset libraries.
"""

from __future__ import annotations

import io
from typing import BinaryIO, Iterator, Type

from jaxformer.errors import DataError, JaxformerError

BOM = b"\xef\xbb\xbf"  # U+FEFF encoded as UTF-8.
# Every character str.splitlines breaks at (Python's docs, "str.splitlines").
LINE_BREAKS = "\n\x0b\x0c\r\x1c\x1d\x1e\x85\u2028\u2029"
_LINE_BREAKS_TO_SPACES = str.maketrans(dict.fromkeys(LINE_BREAKS, " "))


def iter_lines(stream: BinaryIO, name: str, error: Type[JaxformerError] = DataError
               ) -> Iterator[str]:
  """The lines of the UTF-8 binary `stream` called `name`, without line ends, each read (by
  `stream.readline()`) only when it is asked for.

  Raises `error` ('NAME:LINE: invalid UTF-8 at byte offset N ...', N counted from the start of
  the stream, from 0) when a line that is not UTF-8 is reached.
  """
  offset = 0  # Where the line starts in the stream.
  number = 0
  while True:
    line = stream.readline()
    start = len(BOM) if number == 0 and line.startswith(BOM) else 0
    if not line[start:]:  # The end (a last line without "\n" has bytes of its own).
      return
    number += 1
    try:
      decoded = line[start:].removesuffix(b"\n").decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError as e:
      raise error(f"{name}:{number}: invalid UTF-8 at byte offset {offset + start + e.start} "
                  f"(byte {e.start + 1} of line {number}); save it as UTF-8") from None
    yield decoded
    offset += len(line)


def split_lines(data: bytes, name: str, error: Type[JaxformerError] = DataError) -> list[str]:
  """The lines of UTF-8 `data` (the bytes of a file or stream called `name`): `iter_lines`."""
  return list(iter_lines(io.BytesIO(data), name, error))


def file_lines(path: str, error: Type[JaxformerError] = DataError) -> Iterator[str]:
  """The lines of the UTF-8 text file `path` (see `iter_lines`), read as they are asked for.
  Raises `error` naming the file when it cannot be read, and the line and byte offset when it is
  not UTF-8."""
  try:
    f = open(path, "rb")
  except FileNotFoundError:
    raise error(f"{path}: file not found") from None
  except IsADirectoryError:
    raise error(f"{path}: is a directory, not a file") from None
  except OSError as e:
    raise error(f"{path}: cannot read ({e.strerror})") from None
  with f:
    try:
      yield from iter_lines(f, path, error)
    except OSError as e:
      raise error(f"{path}: cannot read ({e.strerror})") from None


def read_lines(path: str, error: Type[JaxformerError] = DataError) -> list[str]:
  """Every line of the UTF-8 text file `path`, at once (see `file_lines`)."""
  return list(file_lines(path, error))


def one_line(text: str) -> str:
  """`text` with every character a reader may break a line at (LINE_BREAKS) made a space."""
  return text.translate(_LINE_BREAKS_TO_SPACES)
