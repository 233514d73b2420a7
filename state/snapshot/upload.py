"""`POST /score`: an uploaded transaction file, read within a size limit and scored by the same
code as `clv score` (export_onnx.scoring.score_file), with the same options under the same names."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from features.loaders import FORMATS, LoadError, parse_mapping
from state.snapshot.queries import QueryError

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
    opts = {"fmt": fmt, "mapping": mapping,
            "duplicates": dup, "outlier_quantity": int(outlier) if outlier is not None else None,
            "timezone": tz}
    return opts, day, out


def _name(filename: str | None) -> str:
    """The uploaded file's own name for messages, reduced to a safe base name."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename or "").name).lstrip(".")
    return base[:100] or "upload"


async def receive(request: web.Request, limit: int, into: Path) -> Path:
    """The uploaded file written into the directory `into`: the first file part of a multipart
    form, else the whole body. TooLarge past `limit` bytes, before reading them all."""
    if request.content_length is not None and request.content_length > limit + FRAMING:
        raise TooLarge(f"upload of {request.content_length:,} bytes is over api_score_max_bytes "
                       f"({limit:,})")
    if request.content_type.startswith("multipart/"):
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader) and (part.filename or part.name == "file"):
                    return await _copy(part.read_chunk, limit, into / _name(part.filename))
        except (ValueError, HttpProcessingError) as exc:  # aiohttp's words for a broken form
            raise QueryError(f"unreadable multipart form: {exc}") from None
        raise QueryError("the multipart form has no file part (send the file as `file`)")
    return await _copy(request.content.read, limit, into / "upload")


async def _copy(read: Any, limit: int, path: Path) -> Path:
    size = 0
    with path.open("wb") as fh:
        while chunk := await read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"upload over api_score_max_bytes ({limit:,} bytes)")
            fh.write(chunk)
    return path
