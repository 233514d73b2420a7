"""The product's own processes run as children, for `clv demo`, `clv bench` and the tests.

A `Child` is one process in a session of its own (so a stop reaches whatever it started), its
output and errors in a log file. It is checked for life (`check` raises a `ChildError` with the
tail of its log once it has exited), waited on until an HTTP URL answers, stopped gracefully
(SIGTERM to its process group, SIGKILL after a timeout) or killed outright for fault tests. A
`Worker` is `clv worker` on a free loopback web port, read through its probes and /metrics; a
`Broker` the embedded Kafka-protocol broker. A `Supervisor` holds a run's children and stops
them all, newest first, on the way out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

from stream import broker
from stream.broker import free_port
from stream.metrics import idle, scrape

TAIL_CHARS = 3000  # of a child's log, in the error saying it died or never became ready
STOP_TIMEOUT_S = 30.0  # from SIGTERM to SIGKILL
KILLED_WAIT_S = 10.0  # for a process after SIGKILL


def python_module(module: str, *args: str) -> list[str]:
    """The command line of `python -m MODULE ARGS` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def clv(*args: str) -> list[str]:
    """The command line of `clv ARGS` with this interpreter and this checkout."""
    return python_module("stream.cli", *args)


class ChildError(RuntimeError):
    """A child exited or never became ready: the message says which, and ends with its log."""


def http_get(url: str, token: str = "", timeout: float = 5) -> tuple[int, str]:
    """(status, body) of a GET; (0, "") when nothing answers."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return 0, ""


def tail(text: str, chars: int = TAIL_CHARS) -> str:
    """The end of a log, from a line start when one is near enough."""
    if len(text) <= chars:
        return text
    cut = text[-chars:]
    newline = cut.find("\n")
    return cut[newline + 1 :] if 0 <= newline < chars // 4 else cut


def wait_for(
    what: str,
    ok: Callable[[], bool],
    timeout: float,
    interval: float = 0.2,
    check: Callable[[], None] = lambda: None,
    where: str = "",
) -> float:
    """Poll `ok` until it holds, calling `check` (which raises when a process died) before each
    try; the seconds it took, or a ChildError naming `what` (and `where` to look) at timeout."""
    started = time.monotonic()
    while True:
        check()
        if ok():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise ChildError(f"{what} not reached after {timeout:.0f}s" + (f"; {where}" if where else ""))
        time.sleep(interval)


class Child:
    """One child process in a session of its own, its stdout and stderr in `log`."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        log: Path,
        name: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name or Path(log).stem
        self.log = Path(log)
        with self.log.open("wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                list(args),
                env=None if env is None else dict(env),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Its log so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check(self) -> None:
        """Nothing while it runs; a ChildError with its exit code and log tail once it exited."""
        if self.proc.poll() is not None:
            raise ChildError(f"{self.name} exited with {self.proc.returncode}; see {self.log}\n{tail(self.output())}")

    def wait_for(self, what: str, ok: Callable[[], bool], timeout: float, interval: float = 0.2) -> float:
        """Seconds until `ok` holds while this child runs; a ChildError with its log tail when it
        exits first or the time is up."""
        try:
            return wait_for(what, ok, timeout, interval, self.check, f"see {self.log}")
        except ChildError as exc:
            if self.running():  # timed out: say what the child said meanwhile
                raise ChildError(f"{self.name}: {exc}\n{tail(self.output())}") from None
            raise

    def wait_http(self, url: str, timeout: float, interval: float = 0.2) -> float:
        """Seconds until `url` answers 200."""
        return self.wait_for(f"{url} answering", lambda: http_get(url, timeout=2)[0] == 200, timeout, interval)

    def send_signal(self, sig: int) -> None:
        """Send `sig` to its process group (to it alone when that is not allowed)."""
        if self.proc.returncode is not None:
            return  # reaped: its pid may name another process by now
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass  # already gone
        except PermissionError:
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send `sig` (SIGTERM: a graceful stop) to its process group, and wait up to `timeout`,
        then SIGKILL; its exit code."""
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            return self.proc.wait(KILLED_WAIT_S)

    def kill(self) -> int:
        """kill -9 (of its whole process group), as a crash would end it."""
        return self.stop(signal.SIGKILL, KILLED_WAIT_S)


class Broker(Child):
    """The embedded broker (`stream.broker.start`) on `port` (default: a free one), ready to
    accept connections; `bootstrap` is its address."""

    def __init__(self, log: Path, port: int | None = None) -> None:
        self.name, self.log = "broker", Path(log)
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = broker.start(self.port, self.log)


class Worker(Child):
    """`clv worker` on a free loopback web port (more `args` after it), its probes and /metrics
    read over HTTP."""

    def __init__(self, env: Mapping[str, str] | None, log: Path, *args: str, name: str | None = None) -> None:
        self.port = free_port()
        super().__init__(clv("worker", "--web-port", str(self.port), *args), env, log, name)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, token: str = "") -> tuple[int, str]:
        return http_get(self.url(path), token)

    def metrics(self) -> dict[str, float]:
        """Its /metrics as {series: value} (empty until it answers); a ChildError once it exited."""
        self.check()
        return scrape(self.port)

    def idle(self) -> bool:
        return idle(self.metrics())

    def wait_ready(self, timeout: float = 120, interval: float = 0.2) -> float:
        """Seconds until /ready answers 200."""
        return self.wait_http(self.url("/ready"), timeout, interval)

    def rss_mb(self) -> float:
        """Its resident memory in MB, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


C = TypeVar("C", bound=Child)


class Supervisor:
    """The children of one run, each with a log in `workdir`; all stopped, newest first, when
    the `with` block ends or `stop_all` is called."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.children: list[Child] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str] | None) -> Child:
        """`args` as a child writing to WORKDIR/NAME.log."""
        return self.add(Child(args, env, self.workdir / f"{name}.log", name))

    def add(self, child: C) -> C:
        self.children.append(child)
        return child

    def check(self) -> None:
        """A ChildError for the first child that exited."""
        for child in self.children:
            child.check()

    def wait_for(self, what: str, ok: Callable[[], bool], timeout: float, interval: float = 0.3) -> float:
        """Seconds until `ok` holds while every child runs."""
        return wait_for(what, ok, timeout, interval, self.check, f"logs in {self.workdir}")

    def stop_all(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop every child, newest first (the API before the worker before the broker); one
        that cannot be stopped does not keep the others running: its error rises after."""
        failed: BaseException | None = None
        for child in reversed(self.children):
            try:
                child.stop(timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - raised once the rest are stopped
                failed = failed or exc
        if failed is not None:
            raise failed

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt, so a supervisor's clean stop runs even
    when the program was started by a script: shells start background jobs with SIGINT
    ignored, and Python keeps that."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
