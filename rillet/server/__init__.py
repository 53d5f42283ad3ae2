"""The OpenAI-compatible HTTP server behind `rillet serve`.

Kept import-light: the command line builds its options from `ServerConfig` without loading
FastAPI; `rillet.server.serve.run` starts the server.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens, guards and sheds load. The `serve` options are derived from it."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": "require `Authorization: Bearer KEY` on every route but /health "
                "(default: $RILLET_API_KEY, else no key)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model name clients send (default: the model file or folder name)"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a Jinja chat template file to use instead of the model's own"})
    max_queued_requests: int = field(default=256, metadata={
        "help": "most sequences waiting for a slot; beyond it requests get 429"})
    shutdown_timeout: float = field(default=30.0, metadata={
        "help": "seconds in-flight requests may run after SIGTERM before they are aborted"})
    max_request_bytes: int = field(default=16 << 20, metadata={
        "help": "largest accepted request body, in bytes; larger ones get 413"})
    stall_timeout: float = field(default=60.0, metadata={
        "help": "seconds without engine progress after which /health reports 503"})

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be between 0 and 65535, got {self.port}")
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0, got {self.stall_timeout}")
