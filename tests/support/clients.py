"""The real external clients the tests drive: wscat, headless Chromium (playwright-core,
``tests/js/browser.js``), ``rango publish``, a static file server (nginx in front of
Rango is :mod:`support.nginx`).

``scripts/setup`` installs wscat and playwright-core with npm into ``.tools/`` and
Debian's ``chromium``; where it could not, the tests that need them are skipped with
the reason. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from support import AMQP_URL, REPO

TOOLS_BIN = REPO / ".tools" / "node_modules" / ".bin"
PLAYWRIGHT = REPO / ".tools" / "node_modules" / "playwright-core"
BROWSER_JS = REPO / "tests" / "js" / "browser.js"
ARTIFACTS = REPO / "tests" / "artifacts"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]")


def screen_line(raw: bytes) -> str:
    """What a terminal shows of ``raw``: escape sequences dropped, text after the last CR."""
    parts = [ANSI.sub("", part) for part in raw.decode(errors="replace").split("\r")]
    return next((part for part in reversed(parts) if part), "")


def wscat_path() -> str:
    """wscat from ``.tools/`` (or PATH); skip the test if neither has it."""
    for candidate in (str(TOOLS_BIN / "wscat"), shutil.which("wscat")):
        if candidate and os.access(candidate, os.X_OK) and shutil.which("node"):
            return candidate
    pytest.skip("wscat is not installed: scripts/setup installs it with npm into .tools/ "
                "(npm or the npm registry was not available)")


def chromium_path() -> str:
    """Debian's Chromium and playwright-core, or skip the test."""
    chromium = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if chromium is None:
        pytest.skip("Chromium is not installed: scripts/setup installs Debian's chromium "
                    "with apt-get (apt-get was not available or failed)")
    if not shutil.which("node") or not (PLAYWRIGHT / "package.json").exists():
        pytest.skip("playwright-core is not installed: scripts/setup installs it with npm "
                    "into .tools/ (npm or the npm registry was not available)")
    return chromium


def publish_lines(exchange: str, lines: list[str]) -> None:
    """Publish events with the real tool: ``rango publish`` (one ``key body`` a line)."""
    result = subprocess.run(
        [sys.executable, "-m", "rango.cli", "publish", "--exchange", exchange,
         "--amqp-addr", AMQP_URL],
        input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=REPO, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


class Lines:
    """The lines a process writes to a pipe (or a pty), read by a thread; bounded waits."""

    def __init__(self, stream: IO[bytes] | int, name: str) -> None:
        self.name = name
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes] | int) -> None:
        buffer = b""
        try:
            while True:
                if isinstance(stream, int):
                    try:
                        chunk = os.read(stream, 65536)
                    except OSError:  # EIO: the pty's other side is closed
                        chunk = b""
                else:
                    chunk = stream.read1(65536)  # type: ignore[attr-defined]
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._queue.put(screen_line(line))
        finally:
            if buffer:
                self._queue.put(screen_line(buffer))
            self._queue.put(None)

    def expect(self, match: Callable[[str], bool] | str, timeout: float = 10.0) -> str:
        """The next line for which ``match`` is true (or that contains it); others are kept."""
        test = match if callable(match) else (lambda line: match in line)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no line matching {match!r} within {timeout}s; "
                    f"lines so far: {self.seen[-20:]!r}"
                ) from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(
                    f"{self.name}: ended without a line matching {match!r}; lines: {self.seen!r}"
                )
            self.seen.append(line)
            if test(line):
                return line

    def expect_json(self, timeout: float = 10.0) -> Any:
        """The next line that is a JSON value (prompts and blank lines skipped)."""
        line = self.expect(lambda text: text.strip().lstrip("<> ").startswith(("{", "[")),
                           timeout)
        return json.loads(line.strip().lstrip("<> "))


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """An HTTP server for ``directory`` on a free port; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Browser:
    """Headless Chromium, driven by ``tests/js/browser.js`` (playwright-core) over pipes."""

    def __init__(self, chromium: str, profile: Path, log_path: Path) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        assert not any(profile.iterdir()), "the profile directory must start empty"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            ["node", str(BROWSER_JS), chromium, str(profile)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, cwd=REPO,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.lines = Lines(self.proc.stdout, "browser.js")
        try:
            ready = self.lines.expect_json(timeout=30)
        except AssertionError as exc:
            self.close()
            raise AssertionError(f"{exc}\nbrowser log:\n{self.log()}") from None
        assert ready.get("ready"), ready
        self.version = ready.get("version", "")

    def command(self, cmd: str, *, seconds: float = 15.0, **fields: Any) -> Any:
        """Send one command to browser.js; its answer within ``seconds``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        self.proc.stdin.flush()
        try:
            answer = self.lines.expect_json(timeout=seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nbrowser log:\n{self.log()}") from None
        if not answer.get("ok"):
            raise AssertionError(f"browser {cmd} failed: {answer.get('error')}\n"
                                 f"browser log:\n{self.log()}")
        return answer.get("value")

    def goto(self, url: str) -> Any:
        return self.command("goto", url=url)

    def wait(self, expr: str, timeout: float = 10.0, what: str = "") -> None:
        """Wait until the JavaScript expression ``expr`` is truthy in the page."""
        try:
            self.command("wait", expr=expr, timeout=int(timeout * 1000), seconds=timeout + 5)
        except AssertionError as exc:
            raise AssertionError(f"page never satisfied {what or expr}:\n"
                                 f"status={self.text('#status')!r} "
                                 f"notice={self.text('#notice')!r}\n{exc}") from None

    def text(self, selector: str) -> str:
        return self.command("text", selector=selector)

    def rows(self, selector: str) -> list[list[str]]:
        return self.command("rows", selector=selector)

    def evaluate(self, expr: str) -> Any:
        return self.command("eval", expr=expr)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.command("screenshot", path=str(path))
        assert path.stat().st_size > 1000
        return path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def status_has(*streams: str) -> str:
    """A page condition (JavaScript) for :meth:`Browser`'s waits: the example page's status
    line says it is subscribed to every one of ``streams``."""
    checks = " && ".join(f"s.includes({json.dumps(stream)})" for stream in streams)
    status = "document.querySelector('#status').textContent"
    return f"(s => s.startsWith('subscribed') && {checks})({status})"


def page_url(base: str, ws_url: str, market: str) -> str:
    """``examples/orderbook.html`` under ``base``, preset to ``ws_url`` and ``market``."""
    return f"{base}/orderbook.html?url={ws_url}&market={market}"
