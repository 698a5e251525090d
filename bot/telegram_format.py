"""The model's Markdown as Telegram sees it: safe HTML for finished messages, and where
to split an answer longer than one message.

Telegram's HTML mode only rejects `<` outside a supported tag and unbalanced tags, so
the converter escapes every character of the model's text and emits only tags it has
balanced itself; whatever it does not recognise stays literal text. Code (fenced blocks
and `inline` spans) is never formatted inside. The adapter still falls back to plain
text when Telegram refuses a message, so a parse error can cost formatting, never an
answer.
"""

from __future__ import annotations

import html
import re
import unicodedata

MAX_MESSAGE = 4096  # Telegram's limit for one message's text, after entity parsing

_FENCE = re.compile(r"^\s{0,3}```\s*([\w+#.-]*)\s*$")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)[-*+]\s+(?=\S)")
_QUOTE = re.compile(r"^\s{0,3}>\s?")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_LINK = re.compile(r"\[([^\]\n]+)\]\(\s*((?:https?|tg|mailto):[^\s)]+)\s*\)")
# Applied in order to escaped text; content may not contain a tag (`<`/`>`), so the
# tags these produce nest properly or not at all, never cross.
_EMPHASIS = (
    (re.compile(r"\*\*(?=\S)([^<>]*?\S)\*\*"), "b"),
    (re.compile(r"(?<!\w)__(?=\S)([^<>]*?\S)__(?!\w)"), "b"),
    (re.compile(r"~~(?=\S)([^<>]*?\S)~~"), "s"),
    (re.compile(r"(?<![\w*])\*(?=[^\s*])([^<>*]*?[^\s*])\*(?![\w*])"), "i"),
    (re.compile(r"(?<![\w_])_(?=[^\s_])([^<>_]*?[^\s_])_(?![\w_])"), "i"),
)
_HOLE = "\ue000{}\ue001"  # placeholders for code spans and links (private-use chars)
_HOLE_RE = re.compile("\ue000(\\d+)\ue001")
# Where a message may end, best first; each cuts just after the match.
_BREAKS = (
    re.compile(r"\n\s*\n"),
    re.compile(r"\n"),
    re.compile(r"[.!?;:…](?=\s)|[。！？；]"),
    re.compile(r"[,，、](?=\s)|[，、]"),
    re.compile(r"\s"),
)


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units. Limits are kept in these units, which never count
    fewer than code points, so a part fits however Telegram counts."""
    return len(text.encode("utf-16-le")) // 2


def _index_at(text: str, units: int) -> int:
    """The longest prefix of `text` (in code points) that fits in `units` UTF-16 units."""
    used = 0
    for index, char in enumerate(text):
        used += 2 if ord(char) > 0xFFFF else 1
        if used > units:
            return index
    return len(text)


def _joins_previous(char: str) -> bool:
    """Characters that belong to the one before them (never start a message with one)."""
    code = ord(char)
    return (
        unicodedata.combining(char) != 0
        or char in "\u200d\ufe0e\ufe0f"
        or 0x1F3FB <= code <= 0x1F3FF  # skin tones
        or 0xE0020 <= code <= 0xE007F  # tag sequences (flags of regions)
    )


def _grapheme_safe(text: str, cut: int) -> int:
    """Move a hard cut left until it does not split an emoji sequence or accent."""
    start = cut
    while 0 < cut < len(text) and (_joins_previous(text[cut]) or text[cut - 1] == "\u200d"):
        cut -= 1
    # Flags are pairs of regional indicators: do not split a pair.
    indicators = 0
    while cut - indicators > 0 and 0x1F1E6 <= ord(text[cut - indicators - 1]) <= 0x1F1FF:
        indicators += 1
    if indicators % 2 == 1 and cut < len(text) and 0x1F1E6 <= ord(text[cut]) <= 0x1F1FF:
        cut -= 1
    return cut if cut > 0 else start


def split_point(text: str, limit: int = MAX_MESSAGE) -> int:
    """Where the first message of `text` should end: the best break (paragraph, line,
    sentence, clause, space) in the second half of what fits, else a cut that keeps
    emoji and accents whole. Returns len(text) when everything fits."""
    if utf16_len(text) <= limit:
        return len(text)
    fits = _index_at(text, limit)
    floor = fits // 2
    window = text[:fits]
    for pattern in _BREAKS:
        ends = [m.end() for m in pattern.finditer(window, floor)]
        if ends:
            return ends[-1]
    return _grapheme_safe(text, fits)


def split_text(text: str, limit: int = MAX_MESSAGE) -> list[str]:
    """All the messages `text` needs (for notices; answers split as they stream)."""
    parts = []
    while utf16_len(text) > limit:
        cut = split_point(text, limit)
        parts.append(text[:cut])
        text = text[cut:]
    parts.append(text)
    return [part for part in parts if part.strip()]


def open_fence(text: str) -> str | None:
    """The opening line of a code block left open at the end of `text`, else None."""
    opened: str | None = None
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if match is None:
            continue
        if opened is None:
            opened = line.strip()
        elif not match.group(1):
            opened = None
    return opened


def to_html(markdown: str) -> str:
    """Telegram HTML for the model's Markdown: code blocks, inline code, bold, italic,
    strikethrough, links, headings (bold), bullets and quotes; everything else escaped."""
    out: list[str] = []
    code: list[str] | None = None
    language = ""
    quote: list[str] = []
    for line in markdown.split("\n"):
        fence = _FENCE.match(line)
        if code is not None:
            if fence and not fence.group(1):
                out.append(_pre(code, language))
                code = None
            else:
                code.append(line)
            continue
        if _QUOTE.match(line):
            quote.append(_inline(_QUOTE.sub("", line, count=1)))
            continue
        if quote:
            out.append("<blockquote>" + "\n".join(quote) + "</blockquote>")
            quote = []
        if fence:
            code, language = [], fence.group(1)
        else:
            out.append(_line(line))
    if quote:
        out.append("<blockquote>" + "\n".join(quote) + "</blockquote>")
    if code is not None:  # a block cut off at the end of a message: close it here
        out.append(_pre(code, language))
    return "\n".join(out)


def is_plain(markdown: str) -> bool:
    """True when formatting would change nothing the user sees."""
    return to_html(markdown) == html.escape(markdown, quote=False)


def _pre(lines: list[str], language: str) -> str:
    body = html.escape("\n".join(lines), quote=False)
    if not body.strip():
        return body
    if language:
        return f'<pre><code class="language-{html.escape(language)}">{body}</code></pre>'
    return f"<pre>{body}</pre>"


def _line(line: str) -> str:
    heading = _HEADING.match(line)
    if heading:
        title = heading.group(1).replace("**", "").replace("__", "")
        return f"<b>{_inline(title)}</b>" if title.strip() else _inline(line)
    bullet = _BULLET.match(line)
    if bullet:
        return bullet.group(1) + "• " + _inline(line[bullet.end() :])
    return _inline(line)


def _inline(text: str) -> str:
    """Escape one line and format its spans; code and links are set aside first so that
    nothing inside them is taken for emphasis."""
    text = text.replace("\ue000", "").replace("\ue001", "")
    holes: list[str] = []

    def hole(rendered: str) -> str:
        holes.append(rendered)
        return _HOLE.format(len(holes) - 1)

    def code_span(match: re.Match[str]) -> str:
        body = match.group(2)
        if not body.strip():
            return html.escape(match.group(0), quote=False)
        return hole(f"<code>{html.escape(body.strip(), quote=False)}</code>")

    def link(match: re.Match[str]) -> str:
        url = html.escape(match.group(2), quote=True)
        return hole(f'<a href="{url}">{html.escape(match.group(1), quote=False)}</a>')

    text = _CODE_SPAN.sub(code_span, text)
    text = _LINK.sub(link, text)
    text = html.escape(text, quote=False)
    for pattern, tag in _EMPHASIS:
        text = pattern.sub(rf"<{tag}>\1</{tag}>", text)
    return _HOLE_RE.sub(lambda m: holes[int(m.group(1))], text)
