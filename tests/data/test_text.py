"""jaxformer.data.text: lines end at "\\n" only, for translate and the text datasets alike."""

import io
import os
import pathlib
import subprocess
import sys

import pytest

from jaxformer.data import text
from jaxformer.errors import DataError, InputError

# Every character str.splitlines breaks at, except "\n" and "\r": inside a line, they stay.
INSIDE = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def test_lines_end_at_newline_only_and_keep_what_is_inside_them():
  lines = [f"a{c}b" for c in INSIDE] + ["", "last"]
  data = "".join(line + "\n" for line in lines).encode()
  assert text.split_lines(data, "f") == lines
  assert len(data.decode().splitlines()) > len(lines)  # What str.splitlines would have made.


@pytest.mark.parametrize("data, lines", [
    (b"one\r\ntwo\r\n", ["one", "two"]),                 # Windows line ends.
    (b"one\r\ntwo", ["one", "two"]),                     # ... and no final newline.
    (b"one\ntwo", ["one", "two"]),                       # No final newline.
    (b"one\n\n", ["one", ""]),                           # Only the last newline ends a line.
    (b"\n", [""]),
    (b"", []),
    (b"a\rb\r\n", ["a\rb"]),                             # Only the "\r" of a line end goes.
    (b"\xef\xbb\xbfone\ntwo\n", ["one", "two"]),         # A UTF-8 byte-order mark.
    (b"\xef\xbb\xbf", []),
    (b"one\n\xef\xbb\xbftwo\n", ["one", "\ufefftwo"]),   # Only at the very start.
])
def test_line_ends_byte_order_mark_and_final_newline(data, lines):
  assert text.split_lines(data, "f") == lines


@pytest.mark.parametrize("data, line, offset, column", [
    (b"ok\nab\xffc\n", 2, 5, 3),
    (b"\xff\n", 1, 0, 1),
    (b"\xef\xbb\xbfok\r\n\xc3(\n", 2, 7, 1),      # The offset counts the mark and the "\r".
    (b"ok\nok\nend \xe2\x82", 3, 10, 5),          # Cut in the middle of a character.
])
def test_invalid_utf8_names_the_line_and_the_byte_offset(data, line, offset, column):
  with pytest.raises(InputError) as error:
    text.split_lines(data, "stdin", InputError)
  assert str(error.value) == (f"stdin:{line}: invalid UTF-8 at byte offset {offset} (byte "
                              f"{column} of line {line}); save it as UTF-8")
  assert data[offset] >= 0x80 and "\n" not in str(error.value)


def test_read_lines_of_a_file_and_its_errors(tmp_path):
  path = tmp_path / "a.txt"
  path.write_bytes(text.BOM + "uno\x85dos\r\ntres\n".encode())
  assert text.read_lines(str(path)) == ["uno\x85dos", "tres"]
  with pytest.raises(DataError, match=rf"^{tmp_path / 'missing.txt'}: file not found$"):
    text.read_lines(str(tmp_path / "missing.txt"))
  with pytest.raises(InputError, match=rf"^{tmp_path}: is a directory"):
    text.read_lines(str(tmp_path), InputError)


def test_one_line_leaves_no_line_break_for_any_reader():
  translation = "a\nb\rc" + INSIDE + "d"
  assert set(text.LINE_BREAKS) == set("\n\r" + INSIDE)
  assert text.one_line(translation).splitlines() == ["a b c" + " " * len(INSIDE) + "d"]
  assert text.one_line("uno dos") == "uno dos"


def test_reading_text_loads_no_dataset_library_nor_jax():
  code = ("import sys, jaxformer.data.text; "
          "print(sorted(m for m in ('tensorflow_datasets', 'grain', 'jax') if m in sys.modules))")
  root = pathlib.Path(__file__).resolve().parent.parent.parent
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(root)))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"


class CountingStream(io.BytesIO):
  """A stream that counts its readline calls."""

  def __init__(self, data):
    super().__init__(data)
    self.reads = 0

  def readline(self, *args):
    self.reads += 1
    return super().readline(*args)


def test_iter_lines_reads_one_line_per_line_asked_for():
  stream = CountingStream(text.BOM + b"one\r\n\nthree\nse\xffven\n")
  lines = text.iter_lines(stream, "stdin", InputError)
  assert stream.reads == 0
  assert [next(lines), next(lines)] == ["one", ""] and stream.reads == 2
  assert next(lines) == "three" and stream.reads == 3
  with pytest.raises(InputError, match=r"^stdin:4: invalid UTF-8 at byte offset 17 \(byte 3 "):
    next(lines)


def test_file_lines_opens_the_file_when_the_first_line_is_asked_for(tmp_path):
  lines = text.file_lines(str(tmp_path / "missing.txt"), InputError)  # Nothing read yet.
  with pytest.raises(InputError, match="missing.txt: file not found"):
    next(lines)
