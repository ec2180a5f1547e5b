"""Reading a user's text files (haystacks, MMLU CSVs): regular files only, a size cap, UTF-8, no NUL bytes."""

from __future__ import annotations

from pathlib import Path

from lab.errors import LabError


def read_utf8(file: Path, most: int, what: str, too_large: str | None = None) -> str:
    """The text of `file`, or a one-line LabError: not a regular file (a FIFO would block), unreadable,
    larger than `most` bytes (the message `too_large`, if given), binary, or not UTF-8. `what` names the
    file in the messages."""
    if not file.is_file():
        raise LabError(f"{what} {file} is not a regular file")
    try:
        with file.open("rb") as f:
            data = f.read(most + 1)
    except OSError as error:
        raise LabError(f"{what} {file}: cannot read ({error.strerror or error})") from None
    if len(data) > most:
        raise LabError(too_large or f"{what} {file} is larger than {size(most)}; give a smaller text file")
    if b"\0" in data:
        raise LabError(f"{what} {file} contains NUL bytes: give a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LabError(f"{what} {file} is not UTF-8 text (byte {error.start})") from None


def size(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n} bytes"
