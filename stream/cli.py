"""The `clv` command line. Each subcommand imports what it needs only when it runs, so serving
commands never import torch."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import date
from typing import Any, Sequence

from features.loaders import FORMATS, LoadError
from stream.settings import Settings, SettingsError


class UsageError(Exception):
    """A bad argument: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        raise UsageError(message)


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _file_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="transaction file: Online Retail (I/II) CSV or .xlsx, CDNOW, or CSV with --map")
    p.add_argument("--format", default="auto", choices=FORMATS, help="file layout (default: detect)")
    p.add_argument("--map", default=None, metavar="FIELD=COLUMN,...",
                   help="column mapping for other CSVs, e.g. customer_id=Cust,ts=Date,quantity=Qty,unit_price=Price")
    p.add_argument("--duplicates", choices=("keep", "drop"), default=None,
                   help="exact duplicate lines: keep (default) or drop")
    p.add_argument("--outlier-quantity", type=int, default=None,
                   help="drop lines with |quantity| above this (default 10000; 0 keeps all)")
    p.add_argument("--timezone", default=None, help="zone of zone-less timestamps (default UTC)")


def file_options(args: argparse.Namespace) -> dict[str, Any]:
    """The loader/cleaning keyword arguments a file subcommand was given."""
    from features.loaders import parse_mapping

    return {
        "fmt": args.format,
        "mapping": parse_mapping(args.map) if args.map else None,
        "duplicates": args.duplicates,
        "outlier_quantity": args.outlier_quantity,
        "timezone": args.timezone,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from features.cleaning import CleaningPolicy, clean
    from features.loaders import load
    from features.profile import profile, render

    opts = file_options(args)
    loaded = load(args.file, opts.pop("fmt"), opts.pop("mapping"))
    lines, report = clean(loaded, CleaningPolicy.for_format(loaded.format, **opts))
    p = profile(lines, report)
    print(json.dumps(p, indent=2) if args.json else render(p))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    for name, env, default, doc in Settings.describe():
        print(f"{name:<22}{getattr(settings, name)!r:<28}{env:<40}{doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clv", description="Streaming customer lifetime value.")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="cleaning report and profile of a transaction file")
    _file_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("config", help="print resolved settings with their environment variables")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        settings = Settings.from_env(log_level=args.log_level)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return args.func(args)
    except (UsageError, LoadError, SettingsError) as exc:
        print(f"clv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
