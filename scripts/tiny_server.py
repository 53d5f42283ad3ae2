"""`rillet serve` on a tiny random model, for reliability scripts run without a server of their own."""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 300.0


@dataclass
class TinyServer:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> int:
        """SIGTERM (drain), then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_tiny_server(*args: str, api_key: str | None = None, family: str = "qwen3",
                      env: dict[str, str] | None = None) -> TinyServer:
    """Build a tiny `family` model and serve it with `args`, healthy and ready."""
    from tests.fixtures.tiny_models import make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="rillet-tiny-"))
    atexit.register(shutil.rmtree, workdir, True)
    model = make_tiny_model(family, workdir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "rillet.cli", "serve", "--model", str(model.hf_dir), "--port", str(port),
           "--num-threads", "1", *args, *(["--api-key", api_key] if api_key else [])]
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = TinyServer(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                print(f"rillet serve (pid {proc.pid}) on a tiny {family} model at {server.url}", flush=True)
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"the tiny server did not start:\n{log_path.read_text(errors='replace')}")
