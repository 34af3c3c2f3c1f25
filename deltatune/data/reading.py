"""Text data files read a block at a time: lines come out as they are decoded, so a file of millions of rows is never
held whole in memory (its rows are encoded and written to the on-disk example cache chunk by chunk).

Decoding follows `data.encoding`: "auto" reads UTF-8 and drops a byte-order mark; anything else is a Python codec.
There is no silent fallback to another encoding (latin-1 decodes any bytes and would turn a cp1252 or UTF-16 file
into quiet garbage); a decoding failure is a UserError naming the byte offset, the line and the setting that fixes it.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Iterator

from deltatune.errors import UserError

BLOCK_BYTES = 1 << 20
# A line ends at "\r\n", "\n" or a lone "\r" (old Mac files), and nowhere else: str.splitlines would also cut at
# U+2028 and friends, which JSON strings and CSV cells may contain.
_LINE_END = re.compile(r"\r\n|\n|\r")


def iter_lines(path: Path, encoding: str = "auto") -> Iterator[str]:
    """The file's lines in order, each with its line end (the last one may have none)."""
    codec = "utf-8-sig" if encoding == "auto" else encoding
    try:
        decoder = codecs.getincrementaldecoder(codec)()
    except LookupError:
        raise UserError(f"data.encoding '{encoding}' is not a text encoding Python knows; use auto, utf-8, latin-1 "
                        "or cp1252") from None
    try:
        file = path.open("rb")
    except OSError as exc:
        raise UserError(f"cannot read data file {path} ({exc.strerror}); check that it is readable") from None
    pending, consumed, newlines = "", 0, 0  # undecided text, bytes fed, b"\n" seen before this block
    starts_utf16 = False
    with file:
        while True:
            block = file.read(BLOCK_BYTES)
            if consumed == 0:
                starts_utf16 = block.startswith((b"\xff\xfe", b"\xfe\xff"))  # UTF-16's byte-order marks
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                buffered = len(exc.object) - len(block)  # bytes the decoder held back from the previous block
                offset = consumed - buffered + exc.start
                raise decode_error(path, encoding, exc.object[exc.start], offset,
                                   newlines + exc.object[: exc.start].count(b"\n") + 1,
                                   utf16=starts_utf16) from None
            consumed += len(block)
            newlines += block.count(b"\n")
            text = pending + text
            # A "\r" at the very end may be the first half of "\r\n": hold it until the next block decides.
            cut = len(text) - 1 if block and text.endswith("\r") else len(text)
            start = 0
            for match in _LINE_END.finditer(text, 0, cut):
                yield text[start : match.end()]
                start = match.end()
            pending = text[start:]
            if not block:
                if pending:
                    yield pending
                return


def decode_error(path: Path, encoding: str, byte: int, offset: int, line: int, utf16: bool) -> UserError:
    """The one-line error for bytes the configured encoding cannot decode, with the setting that fixes it."""
    shown = "UTF-8" if encoding == "auto" else encoding
    fix = "set data.encoding to the file's real encoding"
    if encoding == "auto":
        fix = "set data.encoding=utf-16" if utf16 else "set data.encoding=latin-1 (or cp1252, the real encoding)"
    return UserError(f"{path} is not {shown} text: byte 0x{byte:02x} at offset {offset} (line {line}) cannot be "
                     f"decoded; {fix}, or re-save the file as UTF-8")
