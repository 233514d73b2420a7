"""Reads a snapshot in a tight loop until a stop file appears, as an analyst's process would, and
writes what it saw as JSON: reads, errors, inconsistent reads, distinct snapshots seen."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import duckdb


def main(path: Path, stop: Path, out: Path) -> None:
    reads, errors, inconsistent, waiting = 0, [], [], 0
    seen: set[str] = set()
    while not stop.exists():
        if not path.exists():
            waiting += 1
            time.sleep(0.01)
            continue
        try:
            con = duckdb.connect(str(path), read_only=True)
            try:
                rows = con.execute("SELECT count(*) FROM customer_scores").fetchone()[0]
                meta, at = con.execute("SELECT customers, snapshot_at FROM snapshot_meta").fetchone()
                top = con.execute("SELECT count(*) FROM segment_summary").fetchone()[0]
            finally:
                con.close()
            reads += 1
            seen.add(str(at))
            if rows != meta or (rows and not top):
                inconsistent.append([rows, meta, str(at)])
        except Exception as exc:  # every failure is what the test is looking for
            errors.append(f"{type(exc).__name__}: {exc}")
    out.write_text(json.dumps({"reads": reads, "errors": errors[:20], "n_errors": len(errors),
                               "inconsistent": inconsistent[:20], "snapshots_seen": len(seen),
                               "waiting": waiting}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
