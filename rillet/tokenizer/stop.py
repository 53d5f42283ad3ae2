"""Stop strings over streamed text: emit what is safe, hold back what may begin a stop string."""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Feed text chunks; get back the text that can be shown.

    The result does not depend on how the text is chunked: it is what feeding one character at a
    time would give. Generation stops at the first moment a stop string is complete (the earliest
    end; among stop strings ending there, the earliest start), and the text shown ends right
    before it. Until then, a tail of the text that is a prefix of some stop string is held back.
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self.matched: str | None = None
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> str:
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buffer = self._held + text
        hit = self._first_stop(buffer)
        if hit is not None:
            start, self.matched = hit
            self._held = ""
            return buffer[:start]
        keep = self._held_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """End of text: nothing more can complete a stop string, so release what was held."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops:
            start = buffer.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _held_length(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
