"""Sessions on a live server (tiny qwen3): pieces are prefilled as they arrive, and the final request
takes them from the prefix cache and generates exactly what one whole request would."""
from __future__ import annotations

import time

from tests.server.conftest import LiveServer, qwen3, server  # noqa: F401  (fixtures)

PIECES = ["Once upon a time, ", "in a quiet town by the sea, ", "there lived an old clockmaker ",
          "who had never once ", "been late. One morning, ", "his clocks all stopped at"]


def wait_prefilled(http, session_id: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    for _ in range(600):
        info = http.get(f"/v1/sessions/{session_id}").json()
        if info["prefilled"]:
            return info  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError("the session was never prefilled")


def test_pieces_are_prefilled_and_the_final_request_reuses_them(server: LiveServer) -> None:  # noqa: F811
    body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with server.http() as http:
        opened = http.post("/v1/sessions", json={"prompt": PIECES[0]}).json()
        sid = opened["id"]
        assert sid.startswith("sess-") and opened["num_tokens"] > 0
        counts = [opened["num_tokens"]]
        for piece in PIECES[1:-1]:
            r = http.post(f"/v1/sessions/{sid}/append", json={"text": piece})
            assert r.status_code == 200, r.text
            counts.append(r.json()["num_tokens"])
        assert counts == sorted(counts) and len(set(counts)) == len(counts)
        info = wait_prefilled(http, sid)
        final = http.post(f"/v1/sessions/{sid}/generate", json={**body, "text": PIECES[-1]}).json()
        whole = http.post("/v1/completions", json={**body, "prompt": "".join(PIECES)}).json()
        assert http.get(f"/v1/sessions/{sid}").status_code == 404  # generation ends the session
    assert final["choices"][0]["text"] == whole["choices"][0]["text"]
    assert final["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    cached = final["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached % 16 == 0 and cached >= (info["num_tokens"] - 1) // 16 * 16 - 16 and cached > 0


def test_unknown_sessions_and_oversized_sessions(server: LiveServer) -> None:  # noqa: F811
    with server.http() as http:
        assert http.post("/v1/sessions/sess-nope/append", json={"text": "x"}).status_code == 404
        opened = http.post("/v1/sessions", json={}).json()
        sid = opened["id"]
        too_long = http.post(f"/v1/sessions/{sid}/append", json={"text": "word " * 5000})
        assert too_long.status_code == 400 and "context limit" in too_long.json()["error"]["message"]
        # The piece was refused whole.
        assert http.get(f"/v1/sessions/{sid}").json()["num_tokens"] == opened["num_tokens"]
        assert http.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
        assert http.delete(f"/v1/sessions/{sid}").status_code == 404
