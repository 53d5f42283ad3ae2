"""Live `rillet serve` processes on tiny models, and helpers to talk to them."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.tiny_models import TinyModel

STARTUP_TIMEOUT_S = 180.0
# Small and single-threaded: the tests share two cores with whatever else runs.
ENGINE_ARGS = ("--num-kv-tokens", "16384", "--num-threads", "1", "--max-num-batched-tokens", "256")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    proc: subprocess.Popen[bytes]
    url: str
    model: str
    log_path: Path
    api_key: str = "none"
    headers: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", self.api_key),
                             max_retries=0, **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed `name` or `name{label=value,...}`."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def wait_for_metrics(self, check: Any, timeout: float = 60.0) -> dict[str, float]:
        """Poll /metrics until `check(metrics)` holds; returns the last reading either way."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if check(m) or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model: TinyModel | None, log_dir: Path, *args: str, api_key: str | None = None,
                 env: dict[str, str] | None = None) -> LiveServer:
    """`rillet serve` on a tiny model (None: the embedded one), healthy and ready; `env` adds variables."""
    port = free_port()
    model_args = ["--model", str(model.hf_dir)] if model is not None else []
    cmd = [sys.executable, "-m", "rillet.cli", "serve", *model_args, "--port", str(port), *ENGINE_ARGS, *args]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    name = model.hf_dir.name if model is not None else "gemma-3-270m"
    server = LiveServer(proc, f"http://127.0.0.1:{port}", name, log_path)
    if api_key is not None:
        server.api_key = api_key
        server.headers = {"Authorization": f"Bearer {api_key}"}
    _wait_healthy(server)
    return server


def _wait_healthy(server: LiveServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"rillet serve exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    pytest.fail(f"rillet serve did not become healthy:\n{server.log()}")


@pytest.fixture(scope="session")
def qwen3(tiny_models: dict[str, TinyModel]) -> TinyModel:
    """The tiny model that ships a chat template."""
    return tiny_models["qwen3"]


@pytest.fixture(scope="session")
def server(qwen3: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One plain server, shared, on the tiny qwen3 model (tests that stop a server start their own)."""
    live = start_server(qwen3, tmp_path_factory.mktemp("serve"), "--max-request-bytes", str(1 << 20))
    yield live
    live.stop()
