"""`POST /score`: an uploaded transaction file, read within a size limit and scored by the same
code as `clv score` (export_onnx.scoring.score_file), with the same options under the same names."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import Request

from features.loaders import FORMATS, LoadError, parse_mapping
from state.snapshot.queries import QueryError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

CHUNK = 1 << 16
FRAMING = 1 << 16  # multipart boundaries and part headers allowed on top of the file
OUTPUTS = ("json", "csv")
DUPLICATES = ("keep", "drop")
# Query parameter -> what it means; the keys are the API's names for `clv score`'s flags.
PARAMS = {
    "format": "file layout, as `clv score --format` (default: detect)",
    "map": "column mapping for other CSVs, as `--map` (FIELD=COLUMN,...)",
    "duplicates": "exact duplicate lines: keep (default) or drop",
    "outlier_quantity": "drop lines with |quantity| above this (0 keeps all)",
    "timezone": "zone of zone-less timestamps (default UTC)",
    "as_of": "score as of the end of this day, YYYY-MM-DD (default: the newest event)",
    "out": "answer as json (default) or csv",
}


class TooLarge(QueryError):
    """An upload over api_score_max_bytes: answered 413 without reading the rest."""


def score_options(query: Any) -> tuple[dict[str, Any], date | None, str]:
    """(`score_file` keyword arguments, as-of day, output) from the query string; QueryError
    (400) for a value `clv score` would refuse."""
    fmt = query.get("format", "auto")
    if fmt not in FORMATS:
        raise QueryError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    dup = query.get("duplicates")
    if dup is not None and dup not in DUPLICATES:
        raise QueryError(f"duplicates must be keep or drop, got {dup!r}")
    out = query.get("out", "json")
    if out not in OUTPUTS:
        raise QueryError(f"out must be json or csv, got {out!r}")
    outlier = query.get("outlier_quantity")
    if outlier is not None and not re.fullmatch(r"\d{1,9}", outlier):
        raise QueryError(f"outlier_quantity must be a whole number >= 0, got {outlier!r}")
    tz = query.get("timezone")
    if tz is not None:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise QueryError(f"unknown timezone {tz!r}") from None
    as_of = query.get("as_of")
    try:
        day = date.fromisoformat(as_of) if as_of is not None else None
    except ValueError:
        raise QueryError(f"as_of must be a date (YYYY-MM-DD), got {as_of!r}") from None
    try:
        mapping = parse_mapping(query["map"]) if query.get("map") else None
    except LoadError as exc:
        raise QueryError(str(exc).replace("--map", "map")) from None
    opts = {
        "fmt": fmt,
        "mapping": mapping,
        "duplicates": dup,
        "outlier_quantity": int(outlier) if outlier is not None else None,
        "timezone": tz,
    }
    return opts, day, out


def _name(filename: str | None) -> str:
    """The uploaded file's own name for messages, reduced to a safe base name."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename or "").name).lstrip(".")
    return base[:100] or "upload"


async def receive(request: Request, limit: int, into: Path) -> Path:
    """The uploaded file written into the directory `into`: the first file part of a multipart
    form, else the whole body. TooLarge past `limit` bytes, before reading them all."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + FRAMING:
        raise TooLarge(f"upload of {int(length):,} bytes is over api_score_max_bytes ({limit:,})")
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if not kind.startswith(b"multipart/"):
        return await _copy(request, limit, into / "upload")
    if not options.get(b"boundary"):
        raise QueryError("unreadable multipart form: its Content-Type names no boundary")
    part = _FilePart(into, limit)
    parser = MultipartParser(options[b"boundary"], part.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if part.done:
                break
        else:
            parser.finalize()
    except MultipartParseError as exc:
        raise QueryError(f"unreadable multipart form: {exc}") from None
    finally:
        part.close()
    if part.path is None or not part.done:
        raise QueryError("the multipart form has no file part (send the file as `file`)")
    return part.path


class _FilePart:
    """Writes the first part of a form that is a file (it has a file name, or is named `file`)."""

    def __init__(self, into: Path, limit: int) -> None:
        self.into, self.limit = into, limit
        self.path: Path | None = None
        self.done = False
        self.size = 0
        self._fh: Any = None
        self._field = self._value = b""
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._data,
            "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_done(self) -> None:
        _, disposition = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = disposition.get(b"filename")
        if self.path is None and (filename is not None or disposition.get(b"name") == b"file"):
            self.path = self.into / _name(filename.decode("utf-8", "replace") if filename else None)
            self._fh = self.path.open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._fh is None:
            return
        self.size += end - start
        if self.size > self.limit:
            raise TooLarge(f"upload over api_score_max_bytes ({self.limit:,} bytes)")
        self._fh.write(data[start:end])

    def _end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            self.done = True

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


async def _copy(request: Request, limit: int, path: Path) -> Path:
    size = 0
    with path.open("wb") as fh:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"upload over api_score_max_bytes ({limit:,} bytes)")
            fh.write(chunk)
    return path
