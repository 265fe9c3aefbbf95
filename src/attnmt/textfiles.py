"""Text files read line by line, in chunks (never whole), with errors that name the file and line:
the one reader of corpora, test sets and references. Light: ``attnmt-evaluate src= ref=`` reads its
files with it without importing HF ``datasets``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

_CHUNK_BYTES = 1 << 24  # read 16 MB of a text file at a time


class DataError(ValueError):
    """Bad input data or data config; the message names the file, line or key and what to do."""


def line_chunks(path: Path) -> Iterator[list[str]]:
    """The lines of a UTF-8 text file, a chunk at a time, without line endings (``\\n`` or ``\\r\\n``; a
    leading BOM dropped).

    Only ``\\n`` ends a line: other Unicode line separators inside a line do not split it, so
    line-aligned files stay aligned.

    Raises:
        DataError: the file is not valid UTF-8 (the message names the line and column).
    """
    with open(path, "rb") as f:
        first_line, rest, start = 1, b"", True
        while True:
            block = f.read(_CHUNK_BYTES)
            data = rest + block
            if not block:
                if data:
                    yield [_decode(data, path, first_line, start)]  # a last line without a line break
                return
            cut = data.rfind(b"\n")
            if cut < 0:
                rest = data
                continue
            chunk, rest = data[:cut], data[cut + 1 :]
            lines = _decode(chunk, path, first_line, start).split("\n")
            first_line, start = first_line + len(lines), False
            yield [line[:-1] if line.endswith("\r") else line for line in lines]


def _decode(data: bytes, path: Path, first_line: int, start: bool) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}: invalid UTF-8 (byte {data[err.start]:#04x} at byte column {column}: {err.reason}); "
            "convert the file to UTF-8, e.g. with iconv"
        ) from None
    return text.removeprefix("\ufeff") if start else text


def read_lines(path: str | Path) -> list[str]:
    """All lines of a UTF-8 text file (see :func:`line_chunks`), for test sets and references.

    Raises:
        DataError: the file is missing, or is not valid UTF-8 (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return [line for chunk in line_chunks(path) for line in chunk]
