"""Read the transaction files users bring into one raw line-level frame of text columns.

Loading only renames columns and reads text; typing and dropping happen in `cleaning`, so every
row a file holds is either kept or counted there under a reason.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

FIELDS = ("customer_id", "invoice_no", "ts", "stock_code", "quantity", "unit_price", "country")
REQUIRED = ("customer_id", "ts", "quantity", "unit_price")

# Source column -> contract field, per known layout.
LAYOUTS: dict[str, dict[str, str]] = {
    "online-retail": {
        "CustomerID": "customer_id",
        "InvoiceNo": "invoice_no",
        "InvoiceDate": "ts",
        "StockCode": "stock_code",
        "Quantity": "quantity",
        "UnitPrice": "unit_price",
        "Country": "country",
    },
    "online-retail-ii": {
        "Customer ID": "customer_id",
        "Invoice": "invoice_no",
        "InvoiceDate": "ts",
        "StockCode": "stock_code",
        "Quantity": "quantity",
        "Price": "unit_price",
        "Country": "country",
    },
    "cdnow": {
        "customer_id": "customer_id",
        "date": "ts",
        "number_of_cds": "quantity",
        "dollar_value": "amount",
    },
}
FORMATS = ("auto", *LAYOUTS, "csv")


class LoadError(Exception):
    """A file that cannot be read as transactions; the CLI prints it as one line, exit 2."""


@dataclass
class Loaded:
    frame: pd.DataFrame  # columns: FIELDS (text), row order as in the file
    format: str
    notes: list[str] = field(default_factory=list)


def vendored_cdnow() -> Path:
    """Path of the CDNOW file shipped inside the package (works without ../shared)."""
    return Path(str(resources.files("features").joinpath("data", "CDNOW_master.txt.gz")))


def _open_bytes(path: Path) -> bytes:
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    if path.is_dir():
        raise LoadError(f"{path}: is a directory, expected a transaction file")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise LoadError(f"{path}: corrupt gzip ({exc})") from None
    if not data.strip():
        raise LoadError(f"{path}: file is empty")
    return data


def _is_xlsx(data: bytes) -> bool:
    if data[:4] != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return "xl/workbook.xml" in zf.namelist()
    except zipfile.BadZipFile:
        return False


def _read_table(data: bytes, path: Path) -> pd.DataFrame:
    if _is_xlsx(data):
        try:
            return pd.read_excel(io.BytesIO(data), dtype=str, engine="openpyxl").fillna("")
        except Exception as exc:  # noqa: BLE001 - openpyxl raises many types for broken workbooks
            raise LoadError(f"{path}: unreadable Excel workbook ({type(exc).__name__})") from None
    if b"\x00" in data[:4096]:
        raise LoadError(f"{path}: binary content, not CSV, Excel or CDNOW text")
    try:
        text_head = data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        text_head = data[:4096].decode("latin-1")
    first = text_head.splitlines()[0] if text_head.splitlines() else ""
    if first.split() == list(LAYOUTS["cdnow"]):
        sep = r"\s+"
    else:
        sep = ","
    encoding = "utf-8"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        encoding = "latin-1"  # the UCI files are Latin-1 encoded
    options = {"sep": sep, "dtype": str, "keep_default_na": False, "encoding": encoding}
    if sep == ",":
        # Arrow's reader takes half the C parser's time on large files and makes no Python string
        # per value. What it refuses (ragged rows, newlines inside quotes) the C parser reads
        # leniently below, so every file reads as before.
        try:
            return pd.read_csv(io.BytesIO(data), engine="pyarrow", **options)
        except ValueError:  # pyarrow's ArrowInvalid is one
            pass
    try:
        return pd.read_csv(io.BytesIO(data), engine="c", **options)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise LoadError(f"{path}: not a readable CSV ({str(exc).splitlines()[0][:120]})") from None


def _detect(columns: list[str]) -> str | None:
    present = {c.strip() for c in columns}
    for name, layout in LAYOUTS.items():
        if set(layout) <= present:
            return name
    return None


def parse_mapping(text: str) -> dict[str, str]:
    """`customer_id=Cust,ts=Date,...` -> {source column: contract field}."""
    mapping: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        target, sep, source = part.partition("=")
        target, source = target.strip(), source.strip()
        if not sep or not source or target not in FIELDS:
            raise LoadError(f"bad --map entry {part!r}: expected FIELD=COLUMN with FIELD in {', '.join(FIELDS)}")
        mapping[source] = target
    return mapping


def load(path: str | Path, fmt: str = "auto", mapping: dict[str, str] | None = None) -> Loaded:
    """Read a transaction file into text columns named by the contract."""
    path = Path(path)
    if fmt not in FORMATS:
        raise LoadError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    raw = _read_table(_open_bytes(path), path)
    raw.columns = [str(c).strip() for c in raw.columns]
    if mapping:
        layout, fmt = mapping, "csv"
    elif fmt == "csv":
        raise LoadError("--format csv needs --map FIELD=COLUMN,... naming the file's columns")
    else:
        detected = _detect(list(raw.columns))
        if fmt == "auto":
            if detected is None:
                raise LoadError(
                    f"{path}: unrecognised columns {list(raw.columns)[:8]}; "
                    "expected Online Retail, Online Retail II or CDNOW, or pass --map"
                )
            fmt = detected
        elif detected != fmt:
            missing = sorted(set(LAYOUTS[fmt]) - set(raw.columns))
            raise LoadError(f"{path}: not {fmt}: missing columns {missing}")
        layout = LAYOUTS[fmt]
    missing = sorted(set(layout) - set(raw.columns))
    if missing:
        raise LoadError(f"{path}: missing columns {missing}")
    frame = raw[list(layout)].rename(columns=layout)
    notes: list[str] = []
    if fmt == "cdnow":
        frame, notes = _cdnow_lines(frame)
    for name in FIELDS:
        if name not in frame.columns:
            frame[name] = ""
    if fmt != "cdnow":
        absent = [f for f in REQUIRED if f not in layout.values()]
        if absent:
            raise LoadError(f"--map must name columns for {absent}")
    return Loaded(frame[list(FIELDS)].reset_index(drop=True), fmt, notes)


def _cdnow_lines(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """CDNOW rows are whole purchases with no invoice number: one row becomes one invoice."""
    key = ["customer_id", "ts", "quantity", "amount"]
    repeats = int(frame.duplicated(key).sum())
    occurrence = frame.groupby(["customer_id", "ts"], sort=False).cumcount().astype(str)
    frame = frame.assign(
        invoice_no=frame["customer_id"].str.strip() + "-" + frame["ts"].str.strip() + "-" + occurrence,
        stock_code="CD",
    )
    qty = pd.to_numeric(frame["quantity"], errors="coerce")
    amount = pd.to_numeric(frame["amount"], errors="coerce")
    # unit_price * quantity rounds back to the row's dollar amount in cents exactly.
    price = (amount / qty).where(qty > 0)
    frame["unit_price"] = price.map(lambda v: "" if pd.isna(v) else repr(float(v)))
    notes = [
        f"{repeats} rows repeat another row exactly (same customer, day, CDs and amount): "
        "CDNOW records one row per purchase, so they are kept as separate purchases"
    ]
    return frame, notes
