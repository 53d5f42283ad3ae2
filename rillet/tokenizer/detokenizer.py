"""Streaming detokenization: token ids in, finished text deltas out."""

from __future__ import annotations

from collections.abc import Iterable

from rillet.tokenizer.stop import StopMatcher
from rillet.tokenizer.tokenizer import Tokenizer

# Prompt tokens decoded ahead of the output, so a decoder that strips a leading space
# (Llama 2's SentencePiece) keeps the one that separates the output from the prompt.
NUM_CONTEXT_TOKENS = 4

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas, a few tokens of decoding per step.

    Like vLLM and TGI, it decodes only a window `ids[prefix_offset:]` and emits what the last
    token added to `decode(ids[prefix_offset:read_offset])`:

        ids:  ... | prefix_offset ......... read_offset ......... len(ids)
                  |<- text already emitted ->|<- text emitted now ->|

    Text is held back while it may still change: a trailing U+FFFD (a UTF-8 character split
    across byte-level tokens) or a run of SentencePiece `<0xNN>` tokens that may go on (the
    whole run decodes to U+FFFDs if any byte in it is invalid). With no stop string matched, the
    deltas plus `flush()` concatenate to `tokenizer.decode(output_ids)`; a decoder that strips a
    leading space keeps the one after the prompt instead.

    Stop strings are matched across token boundaries (see `StopMatcher`); once one is found,
    `stopped` is set, `matched_stop` names it, and neither it nor anything after is emitted.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.stopped = False
        self.matched_stop: str | None = None
        self._stops = StopMatcher(stop)
        self._hidden = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self._ids = self._context(prompt_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, new_ids: list[int]) -> str:
        """Add generated ids; return the text they finished (possibly "")."""
        if self.stopped:
            return ""
        self._ids.extend(new_ids)
        return self._emit(self._stops.feed(self._decode_new(final=False)))

    def flush(self) -> str:
        """End of generation: emit the text still held back, short of any stop string."""
        if self.stopped:
            return ""
        delta = self._stops.feed(self._decode_new(final=True))
        return self._emit(delta + self._stops.flush())

    def _emit(self, delta: str) -> str:
        self.text += delta
        if self._stops.stopped:
            self.stopped = True
            self.matched_stop = self._stops.matched
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        text = self._decode(window)
        if not final and self._may_change(window, text):
            return ""
        done = self._decode(self._ids[self._prefix_offset : self._read_offset])
        # Keep only the new window; older ids are never decoded again.
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return text[len(done) :]

    def _may_change(self, window: list[int], text: str) -> bool:
        if text.endswith(REPLACEMENT):
            return True
        last = next((i for i in reversed(window) if self._shown(i)), None)
        return last is not None and last in self.tokenizer.byte_fallback_ids

    def _shown(self, token_id: int) -> bool:
        # Skipped special tokens and ids without a token never reach the decoder, so they do not
        # end a byte run.
        return token_id not in self._hidden and self.tokenizer.backend.id_to_token(token_id) is not None

    def _context(self, prompt_ids: list[int]) -> list[int]:
        """The last few prompt ids, when their text is final (no pending byte run or U+FFFD)."""
        for size in range(min(NUM_CONTEXT_TOKENS, len(prompt_ids)), 0, -1):
            context = list(prompt_ids[-size:])
            if not self._may_change(context, self._decode(context)):
                return context
        return []
