"""The one way text files are read (GLUE TSVs, configs, manifests, ``predict --file``): as UTF-8,
with the file named and the encoding problem said in one :class:`TinycompressError`.

Everything the tool reads or writes is UTF-8. A file in another encoding is refused rather than
guessed at: a wrong guess would silently change the texts a model is trained or scored on.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from tinycompress.errors import TinycompressError

_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def decode_utf8(data: bytes, source: str | Path) -> str:
    """``data`` as text (a UTF-8 byte-order mark is dropped); a non-UTF-8 file is one error
    naming ``source``, the byte offset and, where a byte-order mark says so, the encoding it is in."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            raise TinycompressError(
                f"{source} is {name} text, not UTF-8", "re-save it as UTF-8 (e.g. `iconv -f " + name + " -t UTF-8`)"
            )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # exc.start counts from exc.object: the bytes after a UTF-8 byte-order mark, when there is one.
        offset = exc.start + len(data) - len(exc.object)
        line = data[:offset].count(b"\n") + 1
        raise TinycompressError(
            f"{source}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset})",
            "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t UTF-8`)",
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise TinycompressError(
            f"{source}:{line}: contains a NUL character (a binary file, or UTF-16 without a byte-order mark)",
            "pass a UTF-8 text file",
        )
    return text


def read_text(path: str | Path, *, what: str = "file") -> str:
    """The text of ``path`` (UTF-8); a missing, unreadable or non-UTF-8 file is one error naming it.

    ``what`` names the kind of file in the not-found message ("config file", "text file", ...).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TinycompressError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise TinycompressError(f"{path} is a folder, not a {what}") from None
    except OSError as exc:
        raise TinycompressError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return decode_utf8(data, path)
