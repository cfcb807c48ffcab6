"""Reading a memory file into `(line, value, raw)` triples for `graph_from_records`, whatever wrote it.

- Encodings: UTF-8 with or without a byte-order mark; UTF-16 LE or BE with a byte-order mark (what
  PowerShell's `Out-File` and `>` write) or without one (recognised from the zero bytes of `{"`).
- Line endings: "\\n", "\\r\\n" and lone "\\r" (old Macs). A file's line ending is the first one found:
  in a "\\n" file a stray "\\r" or U+2028 inside a line never shifts the line numbers.
- JSONL, streamed line by line: one line in memory at a time. A line may hold several records written
  without a newline between them (two writers, a missing newline): each is read (`json.JSONDecoder.
  raw_decode` in a loop) with that line's number, and a cut-off last record becomes a reject naming it.
  A line may also hold a JSON array of records, or a whole `{"entities": [...], "relations": [...]}`.
- One JSON document (pretty-printed `read_graph` output, or an array of records): recognised when the file
  starts with '{' or '[' and its first line is not JSON by itself; records are then numbered in document
  order from 1 (entities first, then relations), as a live server's `read_graph` is.

What the reader learns goes into the metadata dict it is given: format ("jsonl", "json_document",
"json_array", "json_record"), encoding, line_endings, the document's other top-level keys, and the number
of non-blank lines.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carl_assets.memory.build import MemorySourceError, document_records, is_graph_document

_SNIFF_BYTES = 64 * 1024
_READ_BYTES = 1 << 20
_DECODER = json.JSONDecoder()
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


class BadLine(ValueError):
    """A line, or part of one, that is not a record (invalid UTF-8, malformed or too deeply nested JSON)."""


@dataclass(frozen=True)
class FileShape:
    encoding: str  # "utf-8", "utf-16-le" or "utf-16-be"
    bom: int  # bytes of byte-order mark to skip
    newline: str  # "\n" or "\r"
    line_endings: str  # "lf", "crlf", "cr" (as found in the first 64 KiB)


def sniff(path: Path) -> FileShape:
    """The encoding and line ending of a memory file, from its first 64 KiB."""
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    encoding, bom = "utf-8", 0
    for mark, name in _BOMS:
        if head.startswith(mark):
            encoding, bom = name, len(mark)
            break
    if bom == 0 and len(head) >= 4 and head[1] == 0 and head[3] == 0 and head[0] and head[2]:
        encoding = "utf-16-le"
    elif bom == 0 and len(head) >= 4 and head[0] == 0 and head[2] == 0 and head[1] and head[3]:
        encoding = "utf-16-be"
    text = head[bom:].decode(encoding, errors="replace")
    if encoding != "utf-8" and text.lstrip()[:1] not in ("{", "["):
        # not JSON in UTF-16 after all (a stray "\xff\xfe" line, binary garbage): read it as UTF-8
        encoding, bom = "utf-8", 0
        text = head.decode("utf-8", errors="replace")
    if "\n" in text:
        first = text.index("\n")
        return FileShape(encoding, bom, "\n", "crlf" if first and text[first - 1] == "\r" else "lf")
    if "\r" in text:
        return FileShape(encoding, bom, "\r", "cr")
    return FileShape(encoding, bom, "\n", "lf")


def _split(handle: Any, separator: bytes) -> Iterator[bytes]:
    rest = b""
    while chunk := handle.read(_READ_BYTES):
        parts = (rest + chunk).split(separator)
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _lines(path: Path, shape: FileShape, source: str) -> Iterator[tuple[int, str | BadLine, str]]:
    """(line number, text or BadLine, raw text) per physical line, streamed."""
    with path.open("rb") as handle:
        handle.seek(shape.bom)
        if shape.encoding != "utf-8":
            text_handle = io.TextIOWrapper(handle, encoding=shape.encoding, newline=shape.newline)
            try:
                for number, line in enumerate(text_handle, start=1):
                    text = line.removesuffix("\n").removesuffix("\r")
                    yield number, text, text
            except UnicodeDecodeError as exc:
                raise MemorySourceError(
                    source,
                    f"the file starts as {shape.encoding.upper()} but is not valid "
                    f"{shape.encoding.upper()} ({exc.reason}): save it as UTF-8",
                ) from exc
            return
        chunks = handle if shape.newline == "\n" else _split(handle, b"\r")
        for number, data in enumerate(chunks, start=1):
            data = data.removesuffix(b"\n").removesuffix(b"\r")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadLine(f"not valid UTF-8 at byte {exc.start}"), data.decode("utf-8", "replace")
                continue
            yield number, text, text


def decode_line(text: str) -> list[tuple[Any, str]]:
    """The JSON values of one line with the text of each: usually one; several when records were written
    one after another without a newline; a `BadLine` for what does not parse (then nothing after it)."""
    try:
        return [(json.loads(text), text)]
    except RecursionError:
        return [(BadLine("malformed JSON: nested too deeply"), text)]
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            return [(BadLine(f"malformed JSON: {exc}"), text)]
    except ValueError as exc:  # integers longer than Python reads
        return [(BadLine(f"malformed JSON: {exc}"), text)]
    pieces: list[tuple[Any, str]] = []
    index = _JSON_SPACE.match(text).end()
    while index < len(text):
        try:
            value, end = _DECODER.raw_decode(text, index)
        except (ValueError, RecursionError) as exc:
            pieces.append(
                (
                    BadLine(
                        f"{len(pieces)} record(s) on this line, then text that is not a complete JSON "
                        f"record (cut off while being written?): {exc}"
                    ),
                    text[index:],
                )
            )
            break
        pieces.append((value, text[index:end]))
        index = _JSON_SPACE.match(text, end).end()
    return pieces


def _line_values(number: int, text: str, metadata: dict[str, Any]) -> Iterator[tuple[int, Any, str]]:
    for value, piece in decode_line(text):
        if not is_graph_document(value):
            yield number, value, piece
            continue
        records, others = document_records(value)
        if others:
            metadata.setdefault("document", {}).update(others)
        if not records:
            yield number, BadLine("an empty graph document (no entities, no relations)"), piece
        for record in records:
            yield number, record, json.dumps(record, ensure_ascii=False, default=str)


def _whole_document(path: Path, shape: FileShape) -> tuple[Any, str | None]:
    """(the file parsed as one JSON document, None) or (None, why it is not one)."""
    try:
        text = path.read_bytes()[shape.bom :].decode(shape.encoding)
        return json.loads(text), None
    except (ValueError, RecursionError) as exc:
        return None, str(exc)


def _document_values(document: Any, metadata: dict[str, Any]) -> Iterator[tuple[int, Any, str]]:
    if is_graph_document(document):
        records, others = document_records(document)
        metadata["format"] = "json_document"
        if others:
            metadata["document"] = others
    elif isinstance(document, list):
        records, metadata["format"] = document, "json_array"
    else:
        records, metadata["format"] = [document], "json_record"
    metadata["numbering"] = "record order in the document, from 1"
    metadata["nonblank_lines"] = len(records)
    for number, record in enumerate(records, start=1):
        yield number, record, json.dumps(record, ensure_ascii=False, default=str)


def file_records(path: Path, source: str, metadata: dict[str, Any]) -> Iterator[tuple[int, Any, str]]:
    """`(line, value, raw)` for every record of a memory file (see the module docstring); fills `metadata`."""
    shape = sniff(path)
    metadata.update(
        format="jsonl",
        encoding=shape.encoding + ("-sig" if shape.bom and shape.encoding == "utf-8" else ""),
        line_endings=shape.line_endings,
        nonblank_lines=0,
    )
    first = True
    lines = _lines(path, shape, source)
    for number, text, raw in lines:
        if isinstance(text, BadLine):
            metadata["nonblank_lines"] += 1
            first = False
            yield number, text, raw
            continue
        if not text.strip():
            continue  # blank lines are padding, not data: they are neither nodes nor rejects
        if first and text.lstrip()[:1] in ("{", "[") and _not_json(text):
            document, why = _whole_document(path, shape)
            if why is None:
                lines.close()
                yield from _document_values(document, metadata)
                return
            metadata["not_a_json_document"] = why
        first = False
        metadata["nonblank_lines"] += 1
        yield from _line_values(number, text, metadata)


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError) as exc:
        return not (isinstance(exc, json.JSONDecodeError) and exc.msg == "Extra data")
    return False
