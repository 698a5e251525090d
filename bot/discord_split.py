"""Cutting a long reply into Discord messages: at the last paragraph, line, sentence or
word break that fits, never inside a visible character, and so that the parts joined
are the text (nothing is lost, nothing is added)."""

from __future__ import annotations

import unicodedata


def _joined(before: str, after: str) -> bool:
    """Whether cutting between these two characters would break a visible character
    (combining marks, emoji modifiers and ZWJ sequences, flags)."""
    if after in "\u200d\ufe0e\ufe0f" or before == "\u200d" or unicodedata.combining(after):
        return True
    if 0x1F3FB <= ord(after) <= 0x1F3FF:  # skin tones
        return True
    flags = range(0x1F1E6, 0x1F200)
    return ord(before) in flags and ord(after) in flags


# Where a part may end, best first: (separator, characters of it the part keeps).
BREAKS = (
    (("\n\n",), 0),  # a paragraph
    (("\n",), 0),  # a line
    ((". ", "! ", "? ", "; "), 1),  # a sentence (the part keeps the full stop)
    (("。", "！", "？", "；"), 1),  # a CJK sentence (no space follows)
    ((" ", "\t"), 0),  # a word
)


def split_point(text: str, limit: int) -> int:
    """Where to end the first part of `text` (longer than `limit`): at the last
    paragraph, line, sentence or word break in the second half of the limit, else at
    the limit but never inside a visible character. The whitespace at a break starts
    the next part, so the parts joined are the text."""
    floor = limit // 2
    for separators, kept in BREAKS:
        found = [text.rfind(s, floor, limit + len(s) - kept) for s in separators]
        at = max((f + kept for f in found if f >= 0), default=-1)
        while at > floor and text[at].isspace() and text[at - 1].isspace():
            at -= 1  # the part ends with its last visible character
        if at > 0:
            return at
    cut = limit
    while cut > floor and _joined(text[cut - 1], text[cut]):
        cut -= 1
    return cut


class Splitter:
    """Cuts a growing text into parts of at most `limit` characters. A cut, once made,
    never moves: parts already sent stay valid as the text grows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cuts: list[int] = []

    def parts(self, text: str) -> list[str]:
        start = self._cuts[-1] if self._cuts else 0
        while len(text) - start > self.limit:
            start += split_point(text[start:], self.limit)
            self._cuts.append(start)
        bounds = [0, *self._cuts, len(text)]
        parts = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        parts[-1] = parts[-1].rstrip()
        return [p for p in parts if p.strip()]
