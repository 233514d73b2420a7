"""`clv bench api`: the analyst API under many concurrent clients, alone on a snapshot of N
customers (written by the sink's own store), rate limit off, a token and the audit log on as in
a deployment. Per endpoint mix (customer lookups, top-50 lists, segment tables, CSV exports, and
lookups while exports stream): requests/s, p50 and p99 latency, 5xx answers and connection
errors.

The load comes from another process (`python -m stream.bench_api URL ...`): an asyncio client
holding `clients` connections, each sending its next request as soon as the last is answered.
It reports the CPU it used, so a reader can tell whether the client or the API was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from stream.broker import free_port
from stream.processes import Child, clv, http_get, python_module, wait_for

TOKEN = "bench-token"
# Per mix, the requests each client sends in turn: (mix, path maker given a random generator and
# the customer count).
SEGMENT_FILTERS = ("", "?segment=vip", "?segment=regular", "?segment=high", "?country=France", "?min_frequency=3")
MIXES: dict[str, Callable[[random.Random, int], str]] = {
    "lookups": lambda rng, n: f"/customers/{customer_id(rng.randrange(n))}",
    "top50": lambda rng, n: "/top?n=50" + SEGMENT_FILTERS[rng.randrange(len(SEGMENT_FILTERS))].replace("?", "&"),
    "segments": lambda rng, n: "/segments",
    "exports": lambda rng, n: "/export.csv?segment=vip",
}
EXPORTERS = 2  # clients streaming exports in the "lookups_during_exports" mix; the rest look up


def customer_id(i: int) -> str:
    return f"c{i:08d}"


def write_snapshot(path: Path, customers: int) -> None:
    """A snapshot of `customers` customers as the sink writes it: every segment, four clusters,
    three countries and unknown ones, CLV spread over four orders of magnitude."""
    from features.segments import SEGMENTS
    from state.snapshot import tables
    from stream.sink import bench_score

    template = bench_score()
    for old in path.parent.glob(f"*{path.name}*"):
        old.unlink()
    store = tables.Snapshots(path, "clv-scores")
    try:
        store.open()
        for i in range(customers):
            clv = (i * 7919 % 10_007) / 10
            score = replace(
                template,
                customer_id=customer_id(i),
                clv=clv,
                clv_high=2.5 * clv,
                clv_sd=1.2 * clv,
                frequency=1 + i % 12,
                segment=SEGMENTS[i % len(SEGMENTS)],
                cluster=("steady", "lapsed", "big_basket", "new")[i % 4],
                country=("United Kingdom", "France", "Germany", "")[i % 4],
            )
            store.put(score.customer_id, tables.row(score, 0, i))
        store.offsets = {0: customers}
        store.publish()
    finally:
        store.close()


def run(customers: int, clients: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """Build the snapshot, start `clv api` on it, drive each mix for `seconds` from a client
    process; the figures per mix."""
    workdir.mkdir(parents=True, exist_ok=True)
    snapshot = workdir / "clv.duckdb"
    started = time.perf_counter()
    write_snapshot(snapshot, customers)
    built = time.perf_counter() - started
    port = free_port()
    env = {
        **os.environ,
        "CLV_SNAPSHOT_PATH": str(snapshot),
        "CLV_API_TOKEN": TOKEN,
        "CLV_API_RATE_LIMIT_PER_MIN": "0",
        "CLV_API_AUDIT_LOG": str(workdir / "audit.jsonl"),
    }
    api = Child(clv("api", "--port", str(port)), env, workdir / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("API up", lambda: http_get(f"{url}/health")[0] == 200, 60, check=api.check)
        mixes = {}
        for mix in (*MIXES, "lookups_during_exports"):
            mixes[mix] = drive(url, mix, customers, clients, seconds, workdir)
            api.check()
    finally:
        code = api.stop()
    if code != 0:
        raise RuntimeError(f"the API exited with {code} when stopped; see {api.log}")
    return {
        "customers": customers,
        "clients": clients,
        "seconds_per_mix": seconds,
        "snapshot_seconds": round(built, 1),
        "cpus": os.cpu_count(),
        "mixes": mixes,
    }


def drive(url: str, mix: str, customers: int, clients: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """One mix from a client process of its own; its JSON figures."""
    out = workdir / f"load-{mix}.json"
    load = Child(
        python_module(
            "stream.bench_api",
            url,
            "--mix",
            mix,
            "--customers",
            str(customers),
            "--clients",
            str(clients),
            "--seconds",
            str(seconds),
            "--out",
            str(out),
        ),
        None,
        workdir / f"load-{mix}.log",
    )
    if load.proc.wait(seconds + 120) != 0:
        raise RuntimeError(f"the load client of {mix} failed; see {load.log}\n{load.output()[-2000:]}")
    return json.loads(out.read_text())


# The client process.


def _percentile(sorted_ms: list[float], q: float) -> float | None:
    if not sorted_ms:
        return None
    return round(sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))], 1)


async def load(url: str, mix: str, customers: int, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` connections, each sending requests back to back for `seconds` after a second
    of warm-up; the requests answered after the warm-up count, over the time from its end to the
    last answer (a slow export started in the warm-up counts when it ends)."""
    import aiohttp

    warm_until = time.perf_counter() + 1.0
    stop_at = warm_until + seconds
    latencies: dict[str, list[float]] = {}
    counts = {"errors_5xx": 0, "errors_other": 0, "connection_errors": 0, "bytes": 0}
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(k)
        kind = mix
        if mix == "lookups_during_exports":
            kind = "exports" if k < EXPORTERS else "lookups"
        while (now := time.perf_counter()) < stop_at:
            path = MIXES[kind](rng, customers)
            try:
                async with session.get(url + path, headers=headers) as r:
                    size = 0
                    async for chunk in r.content.iter_chunked(1 << 16):
                        size += len(chunk)
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status, size = 0, 0
            done = time.perf_counter()
            if done < warm_until:  # answered during the warm-up
                continue
            if status == 0:
                counts["connection_errors"] += 1
            elif status >= 500:
                counts["errors_5xx"] += 1
            elif status != 200:
                counts["errors_other"] += 1
            counts["bytes"] += size
            latencies.setdefault(kind, []).append((done - now) * 1000)

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    cpu = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(k, session) for k in range(clients)))
    elapsed = time.perf_counter() - warm_until
    cpu_share = (time.process_time() - cpu) / (elapsed + 1.0)
    main_kind = "lookups" if mix == "lookups_during_exports" else mix
    ms = sorted(latencies.get(main_kind, []))
    out: dict[str, Any] = {
        "requests": len(ms),
        "requests_per_s": round(len(ms) / elapsed, 1),
        "p50_ms": _percentile(ms, 0.50),
        "p99_ms": _percentile(ms, 0.99),
        "max_ms": round(ms[-1], 1) if ms else None,
        **counts,
        "client_cpu_share": round(cpu_share, 2),
    }
    if mix == "lookups_during_exports":
        exports = latencies.get("exports", [])
        out.update(
            exporters=EXPORTERS, exports=len(exports), export_mb_per_s=round(counts["bytes"] / 2**20 / elapsed, 1)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stream.bench_api", description="the load client of `clv bench api`")
    p.add_argument("url")
    p.add_argument("--mix", choices=(*MIXES, "lookups_during_exports"), required=True)
    p.add_argument("--customers", type=int, required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = asyncio.run(load(args.url, args.mix, args.customers, args.clients, args.seconds))
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
