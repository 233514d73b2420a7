"""The child-process supervisor the demo, the bench and these tests share (stream.processes),
on small Python children: no broker needed."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from stream.broker import free_port
from stream.processes import (Child, ChildError, Supervisor, clv, http_get, python_module, stop_on_signals,
                              tail, wait_for)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # not a zombie


def test_command_lines_use_this_interpreter():
    assert clv("worker", "--web-port", "1") == [sys.executable, "-m", "stream.cli", "worker", "--web-port", "1"]
    assert python_module("stream.bench_agent", "a") == [sys.executable, "-m", "stream.bench_agent", "a"]


def test_tail_keeps_the_end_from_a_line_start():
    assert tail("short") == "short"
    text = "".join(f"line {i:04d}\n" for i in range(1000))
    cut = tail(text, 100)
    assert text.endswith(cut) and cut.startswith("line ") and len(cut) <= 100
    assert tail("x" * 500, 100) == "x" * 100  # no line start near: the last characters


def test_wait_for_returns_the_seconds_and_names_what_timed_out():
    calls = []
    assert wait_for("ok", lambda: calls.append(1) or len(calls) >= 3, 5, interval=0.01) < 1
    with pytest.raises(ChildError, match=r"never true not reached after 0s; see here"):
        wait_for("never true", lambda: False, 0.05, interval=0.01, where="see here")

    def dead() -> None:
        raise ChildError("child died")

    with pytest.raises(ChildError, match="child died"):  # checked before every try
        wait_for("anything", lambda: True, 5, check=dead)


def test_http_get_says_zero_when_nothing_answers():
    assert http_get(f"http://127.0.0.1:{free_port()}/ready", timeout=1) == (0, "")


def test_a_child_that_exits_is_reported_with_its_log(tmp_path):
    child = Child(python("import sys; print('first words'); print('last words', flush=True); sys.exit(3)"),
                  None, tmp_path / "talker.log")
    assert child.wait(30) == 3
    with pytest.raises(ChildError) as err:
        child.check()
    message = str(err.value)
    assert message.startswith(f"talker exited with 3; see {tmp_path / 'talker.log'}")
    assert message.endswith("first words\nlast words\n")
    with pytest.raises(ChildError, match="exited with 3"):
        child.wait_for("never", lambda: False, 5)
    assert child.stop() == 3  # stopping what already ended is harmless


def test_stop_is_graceful_then_forced_and_reaches_the_whole_group(tmp_path):
    polite = Child(python("import time; print('up', flush=True); time.sleep(60)"), None, tmp_path / "polite.log")
    polite.wait_for("started", lambda: "up" in polite.output(), 30, interval=0.02)
    assert polite.running()
    assert polite.stop() == -signal.SIGTERM

    # Ignores SIGTERM and has a grandchild: SIGKILL after the timeout ends both.
    stubborn = Child(python(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"), None, tmp_path / "stubborn.log")
    stubborn.wait_for("grandchild started", lambda: stubborn.output().strip().isdigit(), 30, interval=0.02)
    grandchild = int(stubborn.output())
    started = time.monotonic()
    assert stubborn.stop(timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 10
    wait_for("grandchild gone", lambda: not alive(grandchild), 10, interval=0.05)


def test_kill_is_kill_9(tmp_path):
    child = Child(python("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"),
                  None, tmp_path / "victim.log")
    assert child.kill() == -signal.SIGKILL


def test_wait_http_until_a_url_answers(tmp_path):
    port = free_port()
    server = Child(python_module("http.server", str(port), "--bind", "127.0.0.1"), None, tmp_path / "http.log",
                   cwd=tmp_path)
    try:
        assert server.wait_http(f"http://127.0.0.1:{port}/", 30, interval=0.05) < 30
        assert http_get(f"http://127.0.0.1:{port}/nothing-here")[0] == 404
    finally:
        server.stop()


def test_a_supervisor_fails_fast_when_a_child_dies_and_stops_all_newest_first(tmp_path):
    order = tmp_path / "order"
    record = ("import pathlib, signal, sys, time\n"
              "def bye(*_):\n"
              f"    with open({str(order)!r}, 'a') as f: f.write(sys.argv[1] + ' ')\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\n"
              "print('up', flush=True)\n"
              "time.sleep(60)\n")
    with Supervisor(tmp_path) as children:
        first = children.start("first", [*python(record), "first"], None)
        second = children.start("second", [*python(record), "second"], None)
        children.wait_for("both up", lambda: "up" in first.output() and "up" in second.output(), 30)
        assert second.log == tmp_path / "second.log"
        children.start("quitter", python("import sys; sys.exit(4)"), None)
        with pytest.raises(ChildError, match="quitter exited with 4"):
            children.wait_for("never", lambda: False, 30)
    assert not first.running() and not second.running()
    assert order.read_text() == "second first "


def test_stop_on_signals_turns_sigterm_into_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop_on_signals()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
