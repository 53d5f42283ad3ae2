"""How much of each chat turn's prompt comes from the prefix cache, on a live server.

Runs a 10-turn conversation against `rillet serve` (the assistant's replies are sent back as the
client received them) and prints, per turn, prompt tokens, cached tokens and their ratio.

    rillet serve --port 8000 &
    python scripts/chat_reuse.py --url http://127.0.0.1:8000
"""
from __future__ import annotations

import argparse

import httpx

QUESTIONS = [
    "Hi! I am planning a trip to the mountains next month. What should I pack?",
    "Good ideas. How warm should my sleeping bag be?",
    "What about food for three days of hiking?",
    "How much water should I carry each day?",
    "Is it safe to drink from mountain streams?",
    "What should I do if the weather turns bad?",
    "How do I tell if I am getting altitude sickness?",
    "Any tips for taking good photos at sunrise?",
    "What is a good way to keep my phone charged?",
    "Thanks! Can you sum up your advice in three short points?",
]


def run(url: str, model: str | None, max_tokens: int) -> list[tuple[int, int]]:
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a friendly, concise travel guide."}]
    rows = []
    with httpx.Client(base_url=url, timeout=600) as http:
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
            reply = http.post("/v1/chat/completions", json=body).raise_for_status().json()
            messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
            usage = reply["usage"]
            rows.append((usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    print("turn  prompt  cached  fraction")
    for turn, (prompt, cached) in enumerate(run(args.url, args.model, args.max_tokens), 1):
        print(f"{turn:4d}  {prompt:6d}  {cached:6d}  {cached / prompt:8.1%}")


if __name__ == "__main__":
    main()
