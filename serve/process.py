"""Run `python -m serve` as a child process on a free port (tests, benchmarks, notebooks).

    with ServerProcess(["--dtype", "float32"]) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `python -m serve` child: start() returns at once, wait_ready() blocks until /health is 200."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, host: str = "127.0.0.1",
                 port: int | None = None, cwd: str | None = None):
        self.host, self.port = host, port or free_port(host)
        self.args = [sys.executable, "-m", "serve", "--host", host, "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.log = tempfile.NamedTemporaryFile(prefix="serve-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerProcess":
        # The child's own session, so a signal to it (or to this process group) stays targeted.
        self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 600.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} before it was ready:\n"
                                   f"{self.output()[-4000:]}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.output()[-4000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait; kill it if it does not exit in `timeout`. -> exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not exit {timeout:.0f}s after signal {sig}; killed it")

    def __enter__(self):
        return self.start().wait_ready()

    def __exit__(self, *exc):
        self.stop()
