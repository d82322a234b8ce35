"""One request's output text, a few tokens at a time: incremental detokenization and stop strings.

Decoding each step's tokens alone would break words a tokenizer spells over several tokens (a
SentencePiece leading space, a UTF-8 character split over byte tokens), and decoding everything
every step is quadratic. So, as vLLM and HF's TextStreamer do, each step decodes a short window
twice -- ids[prefix:read] and ids[prefix:] -- and emits the difference; text that still ends in
U+FFFD (half a character) waits for the next token.

Stop strings are matched on the detokenized text; what could still be the start of one is held
back, so a client never sees part of a stop string, and the text ends just before the match."""
from __future__ import annotations

from typing import Sequence

__all__ = ["TextStream"]


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may start a stop string
        self.ids: list[int] = []
        self.text = ""  # all text so far (cut at the stop string once one matched)
        self.sent = 0  # chars of self.text already handed out
        self.stopped = False  # a stop string matched
        self._prefix = self._read = 0

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text that can go out now."""
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in new_ids)
        self._decode(final=False)
        safe = len(self.text) if self.stopped else len(self.text) - self.hold
        return self._take(safe)

    def finish(self) -> str:
        """The held-back rest, once the request has finished (an incomplete character included, as
        a full decode would write it)."""
        if not self.stopped:
            self._decode(final=True)
        return self._take(len(self.text))

    def _decode(self, final: bool) -> None:
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            old = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self._match_stop(max(0, old - self.hold))

    def _match_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _take(self, upto: int) -> str:
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out
