"""Multi-turn chat on the embedded model: each turn's prompt extends the last one token for token,
so the prefix cache serves all of it but the newest message (usage.prompt_tokens_details.cached_tokens)."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.chat_reuse import QUESTIONS, run
from tests.server.conftest import LiveServer, start_server

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[LiveServer]:
    live = start_server(None, tmp_path_factory.mktemp("chat-reuse"))
    yield live
    assert live.stop() == 0


def test_ten_turn_chat_reuses_the_conversation(embedded: LiveServer) -> None:
    rows = run(embedded.url, None, max_tokens=24)
    assert len(rows) == len(QUESTIONS) == 10
    assert rows[0][1] == 0  # nothing cached before the first turn
    for (prev_prompt, _), (prompt, cached) in itertools.pairwise(rows):
        assert cached % BLOCK_SIZE == 0 and cached < prompt
        # The earlier prompt and the reply the server generated for it are both found again.
        assert cached > prev_prompt
    prompt, cached = rows[-1]
    assert cached / prompt >= 0.9, rows
