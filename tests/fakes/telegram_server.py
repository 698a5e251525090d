"""A fake Telegram Bot API server for tests, spoken to by the real python-telegram-bot.

The server listens on 127.0.0.1 (a free port) and answers ``{base_url}{token}/{method}``
exactly as api.telegram.org does: ``{"ok": true, "result": ...}`` on success and
``{"ok": false, "error_code": N, "description": "..."}`` (plus ``parameters.retry_after`` for
429, ``parameters.migrate_to_chat_id`` for a group upgraded to a supergroup) on failure, so
PTB raises its real exceptions (BadRequest, RetryAfter, ChatMigrated, NetworkError,
Conflict, InvalidToken, ...).

Usage with PTB::

    async with FakeTelegram() as fake:
        app = ApplicationBuilder().token(fake.token).base_url(fake.base_url).build()

What is enforced, and why (sources: tdlib ``td/telegram/MessageEntity.cpp``,
``MessageContent.cpp`` and telegram-bot-api ``Client.cpp``):

* Text length: 1..4096 *Unicode code points* of the text left after entity parsing,
  control-character cleaning and whitespace trimming. tdlib checks
  ``utf8_length(text) > message_text_length_max`` (code points, not UTF-16 units), so 4096
  emoji (8192 UTF-16 units) are accepted and 4097 are refused. Entity offsets and lengths
  are in UTF-16 code units, as in the real API.
* An absent/empty ``text`` is "message text is empty"; text that is only whitespace after
  parsing is "message must be non-empty" (tdlib's fix_formatted_text), as on the real API.
* parse_mode (case-insensitive) "MarkdownV2", "Markdown" and "HTML" are ports of tdlib's
  parsers, so the errors are Telegram's own words, e.g. "Bad Request: can't parse entities:
  Character '.' is reserved and must be escaped with the preceding '\\'" or
  "...: Can't find end of Bold entity at byte offset 0" (byte offsets are UTF-8 bytes of the
  sent text). HTML follows Telegram, which only rejects ``<`` outside a supported tag: a bare
  ``>`` or an unknown ``&entity`` is kept as literal text, exactly like the real server.
* Simplifications: links are checked loosely (http/https/ftp/tg/ton schemes; a scheme-less
  host with a dot gets "http://"); bot-sent messages carry only the entities produced by
  parse_mode/``entities`` (Telegram may add url/mention entities on its own); incoming user
  messages get bot_command, mention (4+ chars), hashtag and http(s) url entities.
"""

from __future__ import annotations

import asyncio
import copy
import http
import inspect
import json
import re
import socket
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from aiohttp import web

JSONDict = dict[str, Any]
ChatType = Literal["private", "group", "supergroup"]

DEFAULT_TOKEN = "123456:TEST-token"
MAX_TEXT_LENGTH = 4096
MAX_CALLBACK_DATA_BYTES = 64

NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)
GET_UPDATES_CONFLICT = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
QUERY_ID_INVALID = (
    "Bad Request: query is too old and response timeout expired or query ID is invalid"
)

# Telegram's default when allowed_updates is empty or was never given.
ALL_UPDATE_TYPES = frozenset(
    {
        "message",
        "edited_message",
        "channel_post",
        "edited_channel_post",
        "business_connection",
        "business_message",
        "edited_business_message",
        "deleted_business_messages",
        "message_reaction",
        "message_reaction_count",
        "inline_query",
        "chosen_inline_result",
        "callback_query",
        "shipping_query",
        "pre_checkout_query",
        "purchased_paid_media",
        "poll",
        "poll_answer",
        "my_chat_member",
        "chat_member",
        "chat_join_request",
        "chat_boost",
        "removed_chat_boost",
    }
)
DEFAULT_ALLOWED_UPDATES = ALL_UPDATE_TYPES - {
    "chat_member",
    "message_reaction",
    "message_reaction_count",
}

# How form values are typed when recorded: PTB sends every value as a string, with
# nested objects JSON-encoded (telegram/request/_requestparameter.py: json_value).
_JSON_PARAMS = frozenset(
    {
        "reply_markup",
        "allowed_updates",
        "entities",
        "caption_entities",
        "commands",
        "scope",
        "reply_parameters",
        "link_preview_options",
        "reaction",
        "media",
        "results",
        "permissions",
        "rights",
        "menu_button",
        "message_ids",
    }
)
_INT_PARAMS = frozenset(
    {
        "message_id",
        "offset",
        "limit",
        "reply_to_message_id",
        "message_thread_id",
        "user_id",
        "from_chat_id",
        "cache_time",
        "until_date",
    }
)
_NUMBER_PARAMS = frozenset({"timeout"})
_BOOL_PARAMS = frozenset(
    {
        "disable_notification",
        "protect_content",
        "drop_pending_updates",
        "show_alert",
        "allow_sending_without_reply",
        "disable_web_page_preview",
        "is_big",
        "allow_paid_broadcast",
    }
)
_CHAT_ACTIONS = frozenset(
    {
        "cancel",
        "typing",
        "upload_photo",
        "record_video",
        "upload_video",
        "record_voice",
        "upload_voice",
        "record_audio",
        "upload_audio",
        "upload_document",
        "choose_sticker",
        "find_location",
        "pick_up_location",
        "record_video_note",
        "upload_video_note",
    }
)
_INLINE_BUTTON_ACTIONS = (
    "url",
    "callback_data",
    "web_app",
    "login_url",
    "switch_inline_query",
    "switch_inline_query_current_chat",
    "switch_inline_query_chosen_chat",
    "copy_text",
    "callback_game",
    "pay",
)
_PATH_RE = re.compile(r"/bot(?P<token>[^/]+)/(?P<method>[A-Za-z0-9_]+)/?")
_TOKEN_SHAPE_RE = re.compile(r"\d+:[A-Za-z0-9_-]+")
_COMMAND_RE = re.compile(r"[a-z0-9_]{1,32}")


# --------------------------------------------------------------------------- errors/records


class ApiError(Exception):
    """A Bot API failure; rendered as the JSON error object Telegram sends."""

    def __init__(
        self,
        status: int,
        description: str,
        retry_after: int | None = None,
        migrate_to_chat_id: int | None = None,
    ) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.retry_after = retry_after
        self.migrate_to_chat_id = migrate_to_chat_id

    def payload(self) -> JSONDict:
        """The error object, with ResponseParameters where Telegram gives them."""
        body: JSONDict = {"ok": False, "error_code": self.status, "description": self.description}
        parameters = {
            "retry_after": self.retry_after,
            "migrate_to_chat_id": self.migrate_to_chat_id,
        }
        parameters = {key: value for key, value in parameters.items() if value is not None}
        if parameters:
            body["parameters"] = parameters
        return body


def bad_request(reason: str) -> ApiError:
    return ApiError(400, f"Bad Request: {reason}")


class EntityParseError(Exception):
    """tdlib's own parse error text; the API prefixes it with "can't parse entities: "."""


@dataclass
class ApiCall:
    """One request the bot made. ``status`` stays None if the client hung up first."""

    method: str
    params: JSONDict
    timestamp: float
    status: int | None = None


@dataclass(frozen=True)
class BotMessage:
    """A snapshot of one message the bot has in a chat, as a user would see it now."""

    chat_id: int
    message_id: int
    text: str
    entities: tuple[JSONDict, ...]
    reply_markup: JSONDict | None
    edit_count: int
    history: tuple[str, ...]  # every text the message has shown, oldest first
    date: int
    edit_date: int | None
    reply_to_message_id: int | None
    reaction: tuple[JSONDict, ...]


@dataclass
class _StoredMessage:
    chat_id: int
    message_id: int
    sender: JSONDict
    from_bot: bool
    text: str
    entities: list[JSONDict]
    reply_markup: JSONDict | None
    date: int
    reply_to_message_id: int | None = None
    edit_date: int | None = None
    edit_count: int = 0
    history: list[str] = field(default_factory=list)
    reaction: list[JSONDict] = field(default_factory=list)
    deleted: bool = False


@dataclass
class _Fault:
    method: str  # lower-cased, as Telegram matches method names case-insensitively
    status: int
    retry_after: int
    description: str | None
    remaining: int


@dataclass(eq=False)  # identity hashing: polls live in a set
class _Poll:
    """A waiting getUpdates; ``terminated`` is set when a newer getUpdates replaces it."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    terminated: bool = False


# --------------------------------------------------------------------------- entities


@dataclass
class _Entity:
    type: str  # Bot API entity type, e.g. "bold", "pre", "text_link"
    offset: int  # UTF-16 code units
    length: int
    extra: JSONDict = field(default_factory=dict)  # url / language / user / custom_emoji_id

    def to_api(self) -> JSONDict:
        return {"offset": self.offset, "length": self.length, "type": self.type, **self.extra}


# Hidden-data entities may consist of whitespace only (tdlib is_hidden_data_entity).
_HIDDEN_TYPES = frozenset({"text_link", "text_mention", "pre", "code"})
_TYPE_PRIORITY = {
    "blockquote": 0,
    "expandable_blockquote": 1,
    "code": 20,
    "text_link": 49,
    "text_mention": 49,
    "bold": 90,
    "italic": 91,
    "underline": 92,
    "strikethrough": 93,
    "spoiler": 94,
    "custom_emoji": 99,
}


def _entity_sort_key(entity: _Entity) -> tuple[int, int, int]:
    """tdlib's sort_entities order: offset, longer first, then type priority."""
    if entity.type == "pre":
        priority = 10 if entity.extra.get("language") else 11
    else:
        priority = _TYPE_PRIORITY.get(entity.type, 50)
    return entity.offset, -entity.length, priority


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the unit of Telegram's entity offsets."""
    return len(text.encode("utf-16-le")) // 2


def _utf16_prefix(text: str) -> list[int]:
    """UTF-16 offset of every code point boundary (len(text) + 1 values)."""
    prefix = [0]
    for char in text:
        prefix.append(prefix[-1] + (2 if ord(char) > 0xFFFF else 1))
    return prefix


# Byte-level helpers mirroring tdlib, which parses the UTF-8 bytes of the sent text.
_BACKSLASH, _LF, _CR = 0x5C, 0x0A, 0x0D
_SPACE_BYTES = frozenset(b" \t\r\n\x00\x0b\x0c")


def _at(data: bytes | bytearray, index: int) -> int:
    """Byte at ``index``, 0 past the end: tdlib reads the C string's terminating NUL."""
    return data[index] if 0 <= index < len(data) else 0


def _is_space(byte: int) -> bool:
    return byte in _SPACE_BYTES


def _first_code_unit(byte: int) -> bool:
    return (byte & 0xC0) != 0x80


def _utf16_units(byte: int) -> int:
    """UTF-16 units of the character starting with this byte (4-byte UTF-8 => pair)."""
    return 2 if byte >= 0xF0 else 1


def _reserved(byte: int) -> EntityParseError:
    return EntityParseError(
        f"Character '{chr(byte)}' is reserved and must be escaped with the preceding '\\'"
    )


def _checked_link(url: str) -> str | None:
    """A loose LinkManager::get_checked_link: None means Telegram drops the entity.

    Like tdlib, a missing scheme becomes http and an empty path becomes "/", so
    "telegram.org" -> "http://telegram.org/" and "https://t.me?x" -> "https://t.me/?x".
    """
    if not url or any(char.isspace() for char in url):
        return None
    if re.match(r"(tg|ton):", url, flags=re.IGNORECASE):
        return url
    scheme_match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    scheme, rest = (
        ("http", url)
        if scheme_match is None
        else (scheme_match.group(1).lower(), url[scheme_match.end() :])
    )
    if scheme not in ("http", "https", "ftp"):
        return None
    host_end = next((index for index, char in enumerate(rest) if char in "/?#"), len(rest))
    host = rest[:host_end]
    if not host:
        return None
    if scheme_match is None and not re.fullmatch(r"[^.:]+(\.[^.:]+)+(:\d+)?", host):
        return None  # a bare word like "as" is not a link
    path = rest[host_end:]
    return f"{scheme}://{host}{'' if path.startswith('/') else '/'}{path}"


def _custom_emoji_id(url: str) -> str:
    """LinkManager::get_link_custom_emoji_id: tg://emoji?id=<positive int64>."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "tg":
        raise EntityParseError("Custom emoji URL must have scheme tg")
    if (parts.netloc or parts.path).strip("/").lower() != "emoji":
        raise EntityParseError('Custom emoji URL must have host "emoji"')
    ids = urllib.parse.parse_qs(parts.query).get("id")
    if not ids:
        raise EntityParseError("Custom emoji URL must have an emoji identifier")
    if not re.fullmatch(r"[1-9]\d{0,18}", ids[0]) or int(ids[0]) >= 2**63:
        raise EntityParseError("Invalid custom emoji identifier specified")
    return ids[0]


def _link_entity(offset: int, length: int, url: str) -> _Entity | None:
    """[text](url) / <a href>: tg://user?id= becomes text_mention, bad links vanish."""
    user = re.fullmatch(r"tg:(?://)?user\?id=(\d+)", url.strip(), flags=re.IGNORECASE)
    if user:
        return _Entity("text_mention", offset, length, {"user": {"id": int(user.group(1))}})
    checked = _checked_link(url)
    return _Entity("text_link", offset, length, {"url": checked}) if checked else None


# MarkdownV2 open-entity names are tdlib's, because they appear in error messages.
_V2_API_TYPES = {
    "Bold": "bold",
    "Italic": "italic",
    "Underline": "underline",
    "Strikethrough": "strikethrough",
    "Spoiler": "spoiler",
    "Code": "code",
    "Pre": "pre",
    "PreCode": "pre",
    "BlockQuote": "blockquote",
    "ExpandableBlockQuote": "expandable_blockquote",
}
_V2_RESERVED = b"_*[]()~`>#+-=|{}.!\n"


@dataclass
class _OpenEntity:
    kind: str
    argument: str
    utf16_offset: int
    byte_offset: int
    out_begin: int


class _MarkdownV2Parser:
    """Port of tdlib parse_markdown_v2 (incl. blockquotes and expandable blockquotes)."""

    def __init__(self, source: str) -> None:
        self.text = source.encode("utf-8")
        self.out = bytearray()
        self.entities: list[_Entity] = []
        self.stack: list[_OpenEntity] = []
        self.utf16 = 0
        self.i = -1
        self.have_blockquote = False
        self.can_start_blockquote = True

    def run(self) -> tuple[str, list[_Entity]]:
        while True:
            self.i += 1
            if self.i >= len(self.text):
                break
            self._step(self.text[self.i])
        self._finish()
        self.entities.sort(key=_entity_sort_key)
        return self.out.decode("utf-8"), self.entities

    def _step(self, byte: int) -> None:
        following = _at(self.text, self.i + 1)
        if byte == _BACKSLASH and 0 < following <= 126:
            self.i += 1
            self.utf16 += 1
            self.out.append(following)
            if following != _CR:
                self.can_start_blockquote = following == _LF
            return
        in_code = bool(self.stack) and self.stack[-1].kind in ("Code", "Pre", "PreCode")
        if byte not in (b"`" if in_code else _V2_RESERVED):
            if _first_code_unit(byte):
                self.utf16 += _utf16_units(byte)
                if byte != _CR:
                    self.can_start_blockquote = False
            self.out.append(byte)
        elif self._closes_entity(byte):
            self._close(byte)
        else:
            self._open(byte)

    def _closes_entity(self, byte: int) -> bool:
        if not self.stack:
            return False
        following = _at(self.text, self.i + 1)
        if self.have_blockquote and byte == _LF and following != ord(">"):
            return True
        kind = self.stack[-1].kind
        triple_backtick = byte == ord("`") and following == ord("`") == _at(self.text, self.i + 2)
        closers: dict[str, bool] = {
            "Bold": byte == ord("*"),
            "Italic": byte == ord("_") and following != ord("_"),
            "Code": byte == ord("`"),
            "Pre": triple_backtick,
            "TextUrl": byte == ord("]"),
            "Underline": byte == ord("_") and following == ord("_"),
            "Strikethrough": byte == ord("~"),
            "Spoiler": byte == ord("|") and following == ord("|"),
            "CustomEmoji": byte == ord("]"),
        }
        closers["PreCode"] = closers["Pre"]
        return closers.get(kind, False)

    def _open(self, byte: int) -> None:
        start, argument = self.i, ""
        following = _at(self.text, self.i + 1)
        char = chr(byte)
        if char == "_":
            kind = "Underline" if following == ord("_") else "Italic"
            self.i += 1 if kind == "Underline" else 0
        elif char in "*~[":
            kind = {"*": "Bold", "~": "Strikethrough", "[": "TextUrl"}[char]
        elif char == "|" and following == ord("|"):
            self.i += 1
            kind = "Spoiler"
        elif char == "`":
            kind, argument = self._open_code()
        elif char == "!" and following == ord("["):
            self.i += 1
            kind = "CustomEmoji"
        elif char == "\n":
            self.utf16 += 1
            self.out.append(_LF)
            self.can_start_blockquote = True
            return
        elif char == ">" and self.can_start_blockquote:
            if self.have_blockquote:
                return  # a continuation line of the open blockquote
            kind, self.have_blockquote = "BlockQuote", True
        else:
            raise _reserved(byte)
        self.stack.append(_OpenEntity(kind, argument, self.utf16, start, len(self.out)))

    def _open_code(self) -> tuple[str, str]:
        text = self.text
        if not (_at(text, self.i + 1) == ord("`") and _at(text, self.i + 2) == ord("`")):
            return "Code", ""
        self.i += 3
        kind, argument = "Pre", ""
        end = self.i
        while not _is_space(_at(text, end)) and _at(text, end) != ord("`"):
            end += 1
        if self.i != end and end < len(text) and _at(text, end) != ord("`"):
            kind, argument = "PreCode", text[self.i : end].decode("utf-8", "replace")
            self.i = end
        current = _at(text, self.i)
        if current in (_LF, _CR):  # one line break after ``` (or ```lang) is skipped
            following = _at(text, self.i + 1)
            self.i += 2 if following in (_LF, _CR) and following != current else 1
        self.i -= 1
        return kind, argument

    def _close(self, byte: int) -> None:
        top = self.stack[-1]
        kind = top.kind
        if byte == _LF and kind != "BlockQuote":
            top, kind = self._close_expandable(top)
        skip = self.utf16 == top.utf16_offset
        entity: _Entity | None = None
        if kind in ("Underline", "Spoiler"):
            self.i += 1
        elif kind in ("Pre", "PreCode"):
            self.i += 2
        elif kind == "TextUrl":
            entity = _link_entity(top.utf16_offset, self.utf16 - top.utf16_offset, self._url(top))
            skip = skip or entity is None
        elif kind == "CustomEmoji":
            entity = self._custom_emoji(top)
        elif kind in ("BlockQuote", "ExpandableBlockQuote"):
            self.have_blockquote = False
            self.out.append(self.text[self.i])
            self.can_start_blockquote = True
            self.utf16 += 1
            skip = False
        if not skip:
            self.entities.append(entity or self._plain_entity(kind, top))
        self.stack.pop()

    def _close_expandable(self, top: _OpenEntity) -> tuple[_OpenEntity, str]:
        """A line break only ends "**>...||" (a spoiler right before it inside a quote)."""
        spoiler_just_opened = top.byte_offset == self.i - 2 or (
            top.byte_offset == self.i - 3 and self.out and self.out[-1] == _CR
        )
        if top.kind != "Spoiler" or not spoiler_just_opened:
            raise self._unclosed(top)
        self.stack.pop()
        top = self.stack[-1]
        if top.kind != "BlockQuote":
            raise self._unclosed(top)
        return top, "ExpandableBlockQuote"

    def _plain_entity(self, kind: str, top: _OpenEntity) -> _Entity:
        extra = {"language": top.argument} if kind == "PreCode" else {}
        return _Entity(_V2_API_TYPES[kind], top.utf16_offset, self.utf16 - top.utf16_offset, extra)

    def _url(self, top: _OpenEntity) -> str:
        if _at(self.text, self.i + 1) != ord("("):
            return self.out[top.out_begin :].decode("utf-8", "replace")
        self.i += 2
        return self._read_parenthesised("URL")

    def _read_parenthesised(self, what: str) -> str:
        begin, url = self.i, bytearray()
        while self.i < len(self.text) and self.text[self.i] != ord(")"):
            following = _at(self.text, self.i + 1)
            if self.text[self.i] == _BACKSLASH and 0 < following <= 126:
                url.append(following)
                self.i += 2
                continue
            url.append(self.text[self.i])
            self.i += 1
        if _at(self.text, self.i) != ord(")"):
            raise EntityParseError(f"Can't find end of a {what} at byte offset {begin}")
        return url.decode("utf-8", "replace")

    def _custom_emoji(self, top: _OpenEntity) -> _Entity:
        if _at(self.text, self.i + 1) != ord("("):
            raise EntityParseError("Custom emoji entity must contain a tg://emoji URL")
        self.i += 2
        extra = {"custom_emoji_id": _custom_emoji_id(self._read_parenthesised("custom emoji URL"))}
        return _Entity("custom_emoji", top.utf16_offset, self.utf16 - top.utf16_offset, extra)

    def _finish(self) -> None:
        if self.have_blockquote:
            kind = "blockquote"
            last = self.stack[-1]
            if last.kind == "Spoiler" and last.byte_offset == len(self.text) - 2:
                self.stack.pop()
                kind = "expandable_blockquote"
            top = self.stack[-1]
            if top.kind == "BlockQuote":
                if self.utf16 != top.utf16_offset:
                    length = self.utf16 - top.utf16_offset
                    self.entities.append(_Entity(kind, top.utf16_offset, length))
                self.stack.pop()
        if self.stack:
            raise self._unclosed(self.stack[-1])

    @staticmethod
    def _unclosed(top: _OpenEntity) -> EntityParseError:
        return EntityParseError(
            f"Can't find end of {top.kind} entity at byte offset {top.byte_offset}"
        )


class _LegacyMarkdownParser:
    """Port of tdlib parse_markdown (parse_mode "Markdown"): _italic_ *bold* `code` [a](b)."""

    _MARKERS = b"_*`["

    def __init__(self, source: str) -> None:
        self.text = source.encode("utf-8")
        self.out = bytearray()
        self.entities: list[_Entity] = []
        self.utf16 = 0
        self.i = -1

    def run(self) -> tuple[str, list[_Entity]]:
        while True:
            self.i += 1
            if self.i >= len(self.text):
                break
            byte = self.text[self.i]
            if byte == _BACKSLASH and _at(self.text, self.i + 1) in self._MARKERS:
                self.i += 1
                self.out.append(self.text[self.i])
                self.utf16 += 1
            elif byte not in self._MARKERS:
                self._copy(byte)
            else:
                self._entity(byte)
        self.entities.sort(key=_entity_sort_key)
        return self.out.decode("utf-8"), self.entities

    def _copy(self, byte: int) -> None:
        if _first_code_unit(byte):
            self.utf16 += _utf16_units(byte)
        self.out.append(byte)

    def _entity(self, marker: int) -> None:
        text, begin = self.text, self.i
        end_char = ord("]") if marker == ord("[") else marker
        self.i += 1
        is_pre, language = False, ""
        if marker == ord("`") and _at(text, self.i) == ord("`") == _at(text, self.i + 1):
            is_pre, language = True, self._pre_language()
        offset = self.utf16
        while self.i < len(text) and (
            text[self.i] != end_char
            or (is_pre and not _at(text, self.i + 1) == ord("`") == _at(text, self.i + 2))
        ):
            self._copy(text[self.i])
            self.i += 1
        if self.i == len(text):
            raise EntityParseError(f"Can't find end of the entity starting at byte offset {begin}")
        if offset != self.utf16:
            self._add(marker, offset, begin, is_pre, language)
        if is_pre:
            self.i += 2

    def _pre_language(self) -> str:
        text = self.text
        self.i += 2
        end, language = self.i, ""
        while not _is_space(_at(text, end)) and _at(text, end) != ord("`"):
            end += 1
        if self.i != end and end < len(text) and _at(text, end) != ord("`"):
            language = text[self.i : end].decode("utf-8", "replace")
            self.i = end
        current = _at(text, self.i)
        if current in (_LF, _CR):
            following = _at(text, self.i + 1)
            self.i += 2 if following in (_LF, _CR) and following != current else 1
        return language

    def _add(self, marker: int, offset: int, begin: int, is_pre: bool, language: str) -> None:
        length = self.utf16 - offset
        char = chr(marker)
        if char in "_*":
            self.entities.append(_Entity("italic" if char == "_" else "bold", offset, length))
        elif char == "`":
            extra = {"language": language} if language else {}
            self.entities.append(_Entity("pre" if is_pre else "code", offset, length, extra))
        else:
            entity = _link_entity(offset, length, self._link_url(begin))
            if entity:
                self.entities.append(entity)

    def _link_url(self, begin: int) -> str:
        text = self.text
        if _at(text, self.i + 1) != ord("("):
            return text[begin + 1 : self.i].decode("utf-8", "replace")
        self.i += 2
        url = bytearray()
        while self.i < len(text) and text[self.i] != ord(")"):
            url.append(text[self.i])
            self.i += 1
        return url.decode("utf-8", "replace")


_HTML_TAGS = frozenset(
    {
        "a",
        "b",
        "strong",
        "i",
        "em",
        "s",
        "strike",
        "del",
        "u",
        "ins",
        "tg-spoiler",
        "tg-emoji",
        "span",
        "pre",
        "code",
        "blockquote",
    }
)
_HTML_SIMPLE = {
    "i": "italic",
    "em": "italic",
    "b": "bold",
    "strong": "bold",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "u": "underline",
    "ins": "underline",
    "tg-spoiler": "spoiler",
    "span": "spoiler",
}


def _decode_html_entity(text: bytes, pos: int) -> tuple[int, int]:
    """tdlib decode_html_entity: (code point, position after it) or (0, pos) if not one."""
    end, code = pos + 1, 0
    if _at(text, pos + 1) == ord("#"):
        end += 1
        hexadecimal = _at(text, pos + 2) == ord("x")
        end += 1 if hexadecimal else 0
        base, digits = (16, b"0123456789abcdefABCDEF") if hexadecimal else (10, b"0123456789")
        while _at(text, end) in digits:
            code = code * base + int(chr(text[end]), 16)
            end += 1
        if code == 0 or code >= 0x10FFFF or end - pos >= 10:
            return 0, pos
    else:
        while chr(_at(text, end)).isascii() and chr(_at(text, end)).isalpha():
            end += 1
        code = {b"lt": 0x3C, b"gt": 0x3E, b"amp": 0x26, b"quot": 0x22}.get(text[pos + 1 : end], 0)
        if code == 0:
            return 0, pos
    return code, end + 1 if _at(text, end) == ord(";") else end


@dataclass
class _OpenTag:
    tag: str
    argument: str
    utf16_offset: int
    out_begin: int


class _HtmlParser:
    """Port of tdlib parse_html: the supported tags only, balanced, case-insensitive."""

    def __init__(self, source: str) -> None:
        self.text = source.encode("utf-8")
        self.out = bytearray()
        self.entities: list[_Entity] = []
        self.stack: list[_OpenTag] = []
        self.utf16 = 0
        self.i = -1

    def run(self) -> tuple[str, list[_Entity]]:
        while True:
            self.i += 1
            if self.i >= len(self.text):
                break
            self._step(self.text[self.i])
        if self.stack:
            raise EntityParseError(
                f'Can\'t find end tag corresponding to start tag "{self.stack[-1].tag}"'
            )
        for entity in self.entities:
            if entity.type == "code":
                entity.extra.pop("language", None)
        self.entities.sort(key=_entity_sort_key)
        try:
            return self.out.decode("utf-8"), self.entities
        except UnicodeDecodeError:
            raise EntityParseError(
                "Text contains invalid Unicode characters after decoding HTML entities, "
                "check for unmatched surrogate code units"
            ) from None

    def _step(self, byte: int) -> None:
        if byte == ord("&"):
            code, after = _decode_html_entity(self.text, self.i)
            if code:
                self.i = after - 1
                self.utf16 += 2 if code > 0xFFFF else 1
                self.out += chr(code).encode("utf-8", "surrogatepass")
                return
        if byte != ord("<"):
            if _first_code_unit(byte):
                self.utf16 += _utf16_units(byte)
            self.out.append(byte)
            return
        begin = self.i
        self.i += 1
        if _at(self.text, self.i) == ord("/"):
            self._close_tag(begin)
        else:
            self._open_tag(begin)

    def _open_tag(self, begin: int) -> None:
        text = self.text
        while not _is_space(_at(text, self.i)) and _at(text, self.i) != ord(">"):
            self.i += 1
        if _at(text, self.i) == 0:
            raise EntityParseError(f"Unclosed start tag at byte offset {begin}")
        tag = text[begin + 1 : self.i].decode("utf-8", "replace").lower()
        if tag not in _HTML_TAGS:
            raise EntityParseError(f'Unsupported start tag "{tag}" at byte offset {begin}')
        argument = ""
        while _at(text, self.i) != ord(">"):
            argument = self._attribute(tag, begin, argument)
        if tag == "span" and argument != "spoiler":
            raise EntityParseError(
                f'Tag "span" must have class "tg-spoiler" at byte offset {begin}'
            )
        self.stack.append(_OpenTag(tag, argument, self.utf16, len(self.out)))

    def _skip_spaces(self) -> None:
        while _at(self.text, self.i) != 0 and _is_space(_at(self.text, self.i)):
            self.i += 1

    def _attribute(self, tag: str, begin: int, argument: str) -> str:
        """Reads one attribute; returns the tag's (possibly updated) argument."""
        text = self.text
        self._skip_spaces()
        if _at(text, self.i) == ord(">"):
            return argument
        name_begin = self.i
        while not _is_space(_at(text, self.i)) and _at(text, self.i) not in b"=>/\"'":
            self.i += 1
        name = text[name_begin : self.i].decode("utf-8", "replace")
        if not name:
            raise EntityParseError(
                f'Empty attribute name in the tag "{tag}" at byte offset {begin}'
            )
        self._skip_spaces()
        if _at(text, self.i) != ord("="):
            if _at(text, self.i) == 0:
                raise EntityParseError(f'Unclosed start tag "{tag}" at byte offset {begin}')
            return "1" if tag == "blockquote" and name == "expandable" else argument
        self.i += 1
        self._skip_spaces()
        if _at(text, self.i) == 0:
            raise EntityParseError(f'Unclosed start tag "{tag}" at byte offset {begin}')
        value = self._attribute_value()
        if _at(text, self.i) == 0:
            raise EntityParseError(f"Unclosed start tag at byte offset {begin}")
        return self._tag_argument(tag, name, value, argument)

    def _attribute_value(self) -> str:
        text = self.text
        quote = _at(text, self.i)
        if quote not in (ord("'"), ord('"')):
            token_begin = self.i
            while chr(_at(text, self.i)).isascii() and (
                chr(_at(text, self.i)).isalnum() or _at(text, self.i) in b".-"
            ):
                self.i += 1
            if not _is_space(_at(text, self.i)) and _at(text, self.i) != ord(">"):
                raise EntityParseError(f"Unexpected end of name token at byte offset {token_begin}")
            return text[token_begin : self.i].decode("utf-8", "replace").lower()
        self.i += 1
        value = bytearray()
        while _at(text, self.i) not in (quote, 0):
            if text[self.i] == ord("&"):
                code, after = _decode_html_entity(text, self.i)
                if code:
                    value += chr(code).encode("utf-8", "surrogatepass")
                    self.i = after
                    continue
            value.append(text[self.i])
            self.i += 1
        if _at(text, self.i) == quote:
            self.i += 1
        return value.decode("utf-8", "replace")

    @staticmethod
    def _tag_argument(tag: str, name: str, value: str, argument: str) -> str:
        if tag == "a" and name == "href":
            return value
        if tag == "code" and name == "class" and value.startswith("language-"):
            return value[len("language-") :]
        if tag == "span" and name == "class" and value.startswith("tg-"):
            return value[len("tg-") :]
        if tag == "tg-emoji" and name == "emoji-id":
            return value
        if tag == "blockquote" and name == "expandable":
            return "1"
        return argument

    def _close_tag(self, begin: int) -> None:
        text = self.text
        if not self.stack:
            raise EntityParseError(f"Unexpected end tag at byte offset {begin}")
        while not _is_space(_at(text, self.i)) and _at(text, self.i) != ord(">"):
            self.i += 1
        end_tag = text[begin + 2 : self.i].decode("utf-8", "replace").lower()
        while _is_space(_at(text, self.i)) and _at(text, self.i) != 0:
            self.i += 1
        if _at(text, self.i) != ord(">"):
            raise EntityParseError(f"Unclosed end tag at byte offset {begin}")
        top = self.stack[-1]
        if end_tag and end_tag != top.tag:
            raise EntityParseError(
                f'Unmatched end tag at byte offset {begin}, expected "</{top.tag}>", '
                f'found "</{end_tag}>"'
            )
        if self.utf16 > top.utf16_offset:
            self._add_entity(top, top.utf16_offset, self.utf16 - top.utf16_offset)
        self.stack.pop()

    def _add_entity(self, top: _OpenTag, offset: int, length: int) -> None:
        last = self.entities[-1] if self.entities else None
        same_span = last is not None and (last.offset, last.length) == (offset, length)
        code_with_language = (
            last is not None and last.type == "code" and bool(last.extra.get("language"))
        )
        if top.tag in _HTML_SIMPLE:
            self.entities.append(_Entity(_HTML_SIMPLE[top.tag], offset, length))
        elif top.tag == "tg-emoji":
            if not top.argument.isdigit() or int(top.argument) == 0:
                raise EntityParseError("Invalid custom emoji identifier specified")
            extra = {"custom_emoji_id": top.argument}
            self.entities.append(_Entity("custom_emoji", offset, length, extra))
        elif top.tag == "a":
            url = top.argument or self.out[top.out_begin :].decode("utf-8", "replace")
            entity = _link_entity(offset, length, url)
            if entity:
                self.entities.append(entity)
        elif top.tag == "pre" and last and same_span and code_with_language:
            last.type = "pre"  # <pre><code class="language-x"> is one pre entity with a language
        elif top.tag == "pre":
            self.entities.append(_Entity("pre", offset, length))
        elif top.tag == "code" and last and same_span and last.type == "pre" and top.argument:
            last.extra["language"] = top.argument
        elif top.tag == "code":
            extra = {"language": top.argument} if top.argument else {}
            self.entities.append(_Entity("code", offset, length, extra))
        else:
            kind = "expandable_blockquote" if top.argument else "blockquote"
            self.entities.append(_Entity(kind, offset, length))


def _parse_markdown_v2(source: str) -> tuple[str, list[_Entity]]:
    return _MarkdownV2Parser(source).run()


def _parse_markdown(source: str) -> tuple[str, list[_Entity]]:
    return _LegacyMarkdownParser(source).run()


def _parse_html(source: str) -> tuple[str, list[_Entity]]:
    return _HtmlParser(source).run()


_PARSERS: dict[str, Callable[[str], tuple[str, list[_Entity]]]] = {
    "markdownv2": _parse_markdown_v2,
    "markdown": _parse_markdown,
    "html": _parse_html,
}


def parse_formatted_text(text: str, parse_mode: str | None) -> tuple[str, list[JSONDict]]:
    """Parses ``text`` like Telegram; raises EntityParseError with tdlib's message."""
    parser = _PARSERS.get((parse_mode or "").lower())
    if parser is None:
        return text, []
    plain, entities = parser(text)
    return plain, [entity.to_api() for entity in entities]


# ------------------------------------------------------- cleaning & trimming (fix_formatted_text)

_Span = tuple[int, int, _Entity]  # code point start, end, entity


def _to_spans(text: str, entities: list[_Entity]) -> list[_Span]:
    prefix = _utf16_prefix(text)
    index_of = {units: index for index, units in enumerate(prefix)}
    spans: list[_Span] = []
    for entity in entities:
        start = index_of.get(entity.offset)
        end = index_of.get(entity.offset + entity.length)
        if start is None or end is None:
            raise bad_request(
                f"entity beginning at UTF-16 offset {entity.offset} ends after the end of the "
                f"text at UTF-16 offset {entity.offset + entity.length}"
            )
        if end > start:
            spans.append((start, end, entity))
    return spans


def _removed_char(code: int) -> bool:
    """\\r, U+2028..U+202E (separators, bidi overrides) and combining vertical lines."""
    return code == 0x0D or 0x2028 <= code <= 0x202E or code in (0x030A, 0x0333, 0x033F)


def _clean_characters(text: str, spans: list[_Span]) -> tuple[str, list[_Span]]:
    """tdlib turns control characters (tab included) into spaces and drops a few others."""
    out: list[str] = []
    new_index = [0] * (len(text) + 1)
    for index, char in enumerate(text):
        new_index[index] = len(out)
        code = ord(char)
        if _removed_char(code):
            continue
        out.append(" " if code <= 0x20 and code != 0x0A else char)
    new_index[len(text)] = len(out)
    moved = [(new_index[start], new_index[end], entity) for start, end, entity in spans]
    return "".join(out), [span for span in moved if span[1] > span[0]]


def _drop_blank_entities(text: str, spans: list[_Span]) -> list[_Span]:
    """Formatting entities lose leading whitespace and vanish if nothing visible is left."""
    kept: list[_Span] = []
    for start, end, entity in spans:
        if entity.type not in _HIDDEN_TYPES:
            while start < end and text[start] in " \n":
                start += 1
        if end > start:
            kept.append((start, end, entity))
    return kept


def _trim(text: str, spans: list[_Span]) -> tuple[str, list[_Span]]:
    """Right-trims everything; left-trims only up to the first entity (so <pre> keeps indent)."""
    last = max(index for index, char in enumerate(text) if char not in " \n")
    text = text[: last + 1]
    spans = [(start, min(end, last + 1), entity) for start, end, entity in spans if start <= last]
    first_entity = min((start for start, _, _ in spans), default=len(text))
    cut = 0
    while cut < first_entity and text[cut] in " \n":
        cut += 1
    return text[cut:], [(start - cut, end - cut, entity) for start, end, entity in spans]


def finalize_text(text: str, entities: list[JSONDict]) -> tuple[str, list[JSONDict]]:
    """The text and entities Telegram stores: cleaned, blank-checked, trimmed, sorted."""
    parsed = [_entity_from_api(entity) for entity in entities]
    text, spans = _clean_characters(text, _to_spans(text, parsed))
    if not any(char not in " \n" for char in text):
        raise bad_request("message must be non-empty")
    text, spans = _trim(text, _drop_blank_entities(text, spans))
    prefix = _utf16_prefix(text)
    result: list[_Entity] = []
    for start, end, entity in spans:
        length = prefix[end] - prefix[start]
        result.append(_Entity(entity.type, prefix[start], length, entity.extra))
    result.sort(key=_entity_sort_key)
    return text, [entity.to_api() for entity in result]


def _entity_from_api(entity: JSONDict) -> _Entity:
    try:
        kind, offset, length = str(entity["type"]), int(entity["offset"]), int(entity["length"])
    except (KeyError, TypeError, ValueError):
        raise bad_request("can't parse MessageEntity: wrong field types") from None
    if offset < 0 or length < 0:
        raise bad_request(f"receive an entity with incorrect offset {offset}")
    extra = {k: v for k, v in entity.items() if k not in ("type", "offset", "length")}
    return _Entity(kind, offset, length, copy.deepcopy(extra))


# --------------------------------------------------------------- entities of incoming messages

_ASCII_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_URL_RE = re.compile(r"(?<![\w/@.])https?://[^\s<>\"']+", re.IGNORECASE)


def _is_word(char: str) -> bool:
    return char == "_" or char.isalnum()


def _ascii_run(text: str, start: int) -> int:
    end = start
    while end < len(text) and text[end] in _ASCII_NAME:
        end += 1
    return end


def _find_bot_commands(text: str) -> Iterable[tuple[int, int, str]]:
    """tdlib match_bot_commands: /cmd{1,64}(@bot{3,32})? not glued to words or / < >."""
    for start, char in enumerate(text):
        if char != "/" or (start and (_is_word(text[start - 1]) or text[start - 1] in "/<>")):
            continue
        end = _ascii_run(text, start + 1)
        if not 1 <= end - start - 1 <= 64:
            continue
        if end < len(text) and text[end] == "@":
            name_end = _ascii_run(text, end + 1)
            if not 3 <= name_end - end - 1 <= 32:
                continue
            end = name_end
        if end < len(text) and (_is_word(text[end]) or text[end] in "/<>"):
            continue
        yield start, end, "bot_command"


def _find_mentions(text: str) -> Iterable[tuple[int, int, str]]:
    """tdlib find_mentions: @name of 2..32 chars, then names under 4 chars are dropped."""
    for start, char in enumerate(text):
        if char != "@" or (start and _is_word(text[start - 1])):
            continue
        end = _ascii_run(text, start + 1)
        if not 4 <= end - start - 1 <= 32:
            continue
        if end < len(text) and _is_word(text[end]):
            continue
        yield start, end, "mention"


def _is_hashtag_letter(char: str) -> bool:
    return (
        char in "_\u200c\u00b7"
        or "\u0d80" <= char <= "\u0dff"
        or char.isalpha()
        or unicodedata.category(char) == "Nd"
    )


def _find_hashtags(text: str) -> Iterable[tuple[int, int, str]]:
    for start, char in enumerate(text):
        if char != "#" or (start and _is_hashtag_letter(text[start - 1])):
            continue
        end = start + 1
        while end < len(text) and _is_hashtag_letter(text[end]):
            end += 1
        body = text[start + 1 : end]
        if not body or (end < len(text) and text[end] == "#"):
            continue
        if any(letter.isalpha() for letter in body[:256]):
            yield start, start + 1 + min(len(body), 256), "hashtag"


def _find_urls(text: str) -> Iterable[tuple[int, int, str]]:
    for match in _URL_RE.finditer(text):
        url = match.group(0).rstrip(".,;:!?)]'\"")
        yield match.start(), match.start() + len(url), "url"


def _longest_first(match: tuple[int, int, str]) -> tuple[int, int]:
    return match[0], match[0] - match[1]


def detect_entities(text: str) -> list[JSONDict]:
    """Entities a Telegram client attaches to a user's plain text message."""
    finders = (_find_bot_commands, _find_mentions, _find_hashtags, _find_urls)
    found = sorted((match for finder in finders for match in finder(text)), key=_longest_first)
    prefix = _utf16_prefix(text)
    entities: list[JSONDict] = []
    covered_until = 0
    for start, end, kind in found:
        if start < covered_until:
            continue  # tdlib keeps only non-intersecting entities
        covered_until = end
        length = prefix[end] - prefix[start]
        entities.append({"offset": prefix[start], "length": length, "type": kind})
    return entities


# ------------------------------------------------------------------------ request decoding


def _decode_value(key: str, value: Any) -> Any:
    """Types one form value the way the Bot API reads it; undecodable JSON stays a string."""
    if not isinstance(value, str):
        return value
    if key in _JSON_PARAMS:
        try:
            return json.loads(value)
        except ValueError:
            return value
    if key in _INT_PARAMS or key == "chat_id":
        return int(value) if re.fullmatch(r"-?\d+", value.strip()) else value
    if key in _NUMBER_PARAMS:
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    if key in _BOOL_PARAMS:
        return value.strip().lower() in ("true", "1", "yes")
    return value


async def _read_params(request: web.Request) -> JSONDict:
    """Query string plus a form-encoded, multipart or JSON body, decoded."""
    raw: JSONDict = dict(request.query)
    if request.can_read_body:
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise bad_request("can't parse JSON encoded request body") from None
            if isinstance(body, dict):
                raw.update(body)
        else:
            form = await request.post()
            for key, value in form.items():
                # An uploaded file is recorded by name only; no method here stores files.
                is_text = isinstance(value, str)
                raw[key] = value if is_text else {"filename": getattr(value, "filename", None)}
    return {key: _decode_value(key, value) for key, value in raw.items()}


def _json_response(status: int, payload: JSONDict) -> web.Response:
    return web.Response(
        text=json.dumps(payload, ensure_ascii=False), status=status, content_type="application/json"
    )


def _default_description(status: int, retry_after: int) -> str:
    known = {
        400: "Bad Request",
        401: "Unauthorized",
        403: "Forbidden: bot was blocked by the user",
        409: GET_UPDATES_CONFLICT,
        429: f"Too Many Requests: retry after {retry_after}",
    }
    if status in known:
        return known[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Error"


def _int_param(params: JSONDict, key: str, missing: str) -> int:
    value = params.get(key)
    if value is None or value == "":
        raise bad_request(missing)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise bad_request(f"invalid {key} specified") from None


def _number_param(params: JSONDict, key: str) -> float:
    """An optional numeric parameter (0 when absent)."""
    value = params.get(key)
    if value in (None, ""):
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        raise bad_request(f"invalid {key} specified") from None


def _callback_datas(markup: JSONDict | None) -> set[str]:
    rows = (markup or {}).get("inline_keyboard", [])
    return {button["callback_data"] for row in rows for button in row if "callback_data" in button}


def _check_inline_button(button: Any) -> None:
    prefix = "can't parse inline keyboard button: "
    if not isinstance(button, dict):
        raise bad_request(prefix + "InlineKeyboardButton must be an Object")
    if not isinstance(button.get("text"), str):
        raise bad_request(prefix + 'Field "text" must be of type String')
    if not any(button.get(action) not in (None, "") for action in _INLINE_BUTTON_ACTIONS):
        raise bad_request(prefix + "Text buttons are unallowed in the inline keyboard")
    data = button.get("callback_data")
    if data not in (None, "") and len(str(data).encode("utf-8")) > MAX_CALLBACK_DATA_BYTES:
        raise bad_request("BUTTON_DATA_INVALID")


def _inline_markup(markup: Any, *, require_inline: bool) -> JSONDict | None:
    """The inline keyboard a message will carry; reply keyboards never appear in Messages."""
    if markup in (None, ""):
        return None
    if isinstance(markup, str):
        raise bad_request("can't parse reply keyboard markup JSON object")
    if not isinstance(markup, dict):
        raise bad_request("object expected as reply markup")
    rows = markup.get("inline_keyboard")
    if rows is None:
        if require_inline:
            raise bad_request("inline keyboard expected")
        return None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise bad_request(
            'field "inline_keyboard" of the InlineKeyboardMarkup must be an Array of Arrays'
        )
    for row in rows:
        for button in row:
            _check_inline_button(button)
    rows = [row for row in rows if row]
    return {"inline_keyboard": copy.deepcopy(rows)} if rows else None


# ------------------------------------------------------------------------------ the server


class FakeTelegram:
    """An in-process Telegram Bot API on 127.0.0.1 with fault injection and user simulation."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot_username: str = "lorabot_test_bot",
        bot_first_name: str = "LoRA Bot",
    ) -> None:
        self.token = token
        self.bot_user: JSONDict = {
            "id": int(token.split(":", 1)[0]),
            "is_bot": True,
            "first_name": bot_first_name,
            "username": bot_username,
        }
        self.calls: list[ApiCall] = []
        self._chats: dict[int, JSONDict] = {}
        self._migrated: dict[int, int] = {}  # a group's id -> its supergroup's
        self._users: dict[int, JSONDict] = {}
        self._messages: dict[int, dict[int, _StoredMessage]] = {}
        self._last_message_id: dict[int, int] = {}
        self._pending: list[JSONDict] = []
        self._last_update_id = 0
        self._allowed_updates: frozenset[str] = DEFAULT_ALLOWED_UPDATES
        self._polls: set[_Poll] = set()
        self._faults: list[_Fault] = []
        self._commands: dict[tuple[str, str], list[JSONDict]] = {}
        self._open_callbacks: dict[str, JSONDict] = {}
        self._callback_answers: dict[str, JSONDict] = {}
        self._last_callback_id = 0
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closed = False
        self._methods: dict[str, Callable[[JSONDict], Any]] = self._method_table()

    # ---- lifecycle

    async def start(self) -> None:
        """Listens on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a long poll the client abandoned must stop waiting.
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self._closed = False

    async def stop(self) -> None:
        """Releases waiting long polls (they answer []), then closes the server."""
        self._closed = True
        for poll in self._polls:
            poll.event.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTelegram:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """What goes into ``ApplicationBuilder().base_url(...)``; PTB appends the token."""
        if self._port is None:
            raise RuntimeError("FakeTelegram is not started")
        return f"http://127.0.0.1:{self._port}/bot"

    # ---- test-facing helpers

    def calls_of(self, method: str) -> list[ApiCall]:
        """Recorded calls of one method (names compare case-insensitively, like Telegram's)."""
        return [call for call in self.calls if call.method.lower() == method.lower()]

    def inject_error(
        self,
        method: str,
        status: int = 429,
        retry_after: int = 1,
        times: int = 1,
        *,
        description: str | None = None,
    ) -> None:
        """The next ``times`` calls of ``method`` fail with ``status`` before doing anything.

        429 carries ``parameters.retry_after`` (PTB raises RetryAfter); 5xx become PTB's
        NetworkError; 400/403 become BadRequest/Forbidden with ``description``.
        """
        self._faults.append(_Fault(method.lower(), status, retry_after, description, times))

    def add_chat(
        self,
        chat_id: int,
        *,
        chat_type: ChatType = "private",
        title: str | None = None,
        first_name: str = "User",
        username: str | None = None,
    ) -> JSONDict:
        """Makes a chat known so the bot may write first (otherwise: "chat not found")."""
        if chat_type == "private":
            self._register_user(chat_id, first_name, username)
        return self._register_chat(chat_id, chat_type, title, first_name, username)

    def migrate_chat(self, old: int, new: int) -> None:
        """The group ``old`` becomes the supergroup ``new``: from now on every call naming
        ``old`` fails as on Telegram, 400 "group chat was upgraded to a supergroup chat"
        with ``parameters.migrate_to_chat_id`` (PTB raises ChatMigrated). The service
        messages announcing it are the test's to queue."""
        title = self._chats.get(old, {}).get("title")
        self._register_chat(new, "supergroup", title, "User", None)
        self._migrated[old] = new

    def bot_messages(self, chat_id: int) -> list[BotMessage]:
        """The bot's messages in a chat as shown now: edits applied, deleted ones gone."""
        stored = self._messages.get(chat_id, {}).values()
        shown = [message for message in stored if message.from_bot and not message.deleted]
        return [self._snapshot(message) for message in shown]

    def pending_updates(self) -> list[JSONDict]:
        """Updates queued and not yet confirmed by a getUpdates offset."""
        return copy.deepcopy(self._pending)

    def callback_answer(self, callback_query_id: str) -> JSONDict | None:
        """The answerCallbackQuery parameters given for a query, if it was answered."""
        answer = self._callback_answers.get(callback_query_id)
        return copy.deepcopy(answer) if answer is not None else None

    def send_text(
        self,
        chat_id: int,
        text: str,
        *,
        user_id: int,
        first_name: str = "User",
        username: str | None = None,
        chat_type: ChatType = "private",
        chat_title: str | None = None,
        reply_to_message_id: int | None = None,
    ) -> JSONDict:
        """A user writes ``text``; queues a ``message`` update and returns the Message."""
        user = self._register_user(user_id, first_name, username)
        if chat_type == "private" and chat_id != user_id:
            raise ValueError("a private chat's id is the user's id")
        self._register_chat(chat_id, chat_type, chat_title, first_name, username)
        reply_to = reply_to_message_id
        if reply_to is not None and self._live_message(chat_id, reply_to) is None:
            raise ValueError(f"no message {reply_to} in chat {chat_id} to reply to")
        message = self._store(chat_id, user, False, text, detect_entities(text), None, reply_to)
        message_dict = self._message_dict(message)
        self.queue_update({"message": message_dict})
        return copy.deepcopy(message_dict)

    def press_button(
        self,
        chat_id: int,
        message_id: int,
        data: str,
        *,
        user_id: int,
        first_name: str = "User",
        username: str | None = None,
        check_button: bool = True,
    ) -> JSONDict:
        """A user taps an inline button; queues a ``callback_query`` update and returns it.

        With ``check_button`` the message must currently show a button with this
        callback_data, which is the only thing a real client can send.
        """
        message = self._live_message(chat_id, message_id)
        if message is None:
            raise ValueError(f"no message {message_id} in chat {chat_id}")
        if check_button and data not in _callback_datas(message.reply_markup):
            raise ValueError(f"message {message_id} has no button with callback_data {data!r}")
        user = self._register_user(user_id, first_name, username)
        self._last_callback_id += 1
        query: JSONDict = {
            "id": str(4_000_000_000_000 + self._last_callback_id),
            "from": user,
            "message": self._message_dict(message),
            "chat_instance": str(abs(chat_id) * 7919 + 1),
            "data": data,
        }
        self._open_callbacks[query["id"]] = query
        self.queue_update({"callback_query": query})
        return copy.deepcopy(query)

    def queue_update(self, body: JSONDict) -> JSONDict:
        """Queues any update body (e.g. ``{"edited_message": {...}}``); assigns update_id.

        Like Telegram, an update of a type outside the current allowed_updates is dropped.
        """
        self._last_update_id += 1
        update = {"update_id": self._last_update_id, **copy.deepcopy(body)}
        kinds = set(body) - {"update_id"}
        if kinds & self._allowed_updates:
            self._pending.append(update)
            for poll in self._polls:
                poll.event.set()
        return copy.deepcopy(update)

    async def wait_for(
        self,
        predicate: Callable[[], Any],
        timeout: float = 10,
        *,
        interval: float = 0.01,
        message: str | None = None,
    ) -> Any:
        """Polls ``predicate`` (sync or async) until truthy and returns its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            if asyncio.get_running_loop().time() >= deadline:
                recent = ", ".join(f"{call.method}->{call.status}" for call in self.calls[-8:])
                what = message or getattr(predicate, "__name__", "condition")
                raise AssertionError(f"{what} not met within {timeout}s; recent calls: [{recent}]")
            await asyncio.sleep(interval)

    # ---- HTTP

    async def _handle(self, request: web.Request) -> web.Response:
        match = _PATH_RE.fullmatch(request.path)
        if match is None:
            return _json_response(404, ApiError(404, "Not Found").payload())
        call = ApiCall(match["method"], {}, time.monotonic())
        self.calls.append(call)
        try:
            call.params = await _read_params(request)
            response = await self._respond(match["token"], match["method"], call.params)
        except ApiError as error:
            response = _json_response(error.status, error.payload())
        call.status = response.status
        return response

    async def _respond(self, token: str, method: str, params: JSONDict) -> web.Response:
        if token != self.token:
            # Telegram: 401 for a well-formed but wrong token, 404 for a malformed one.
            status = 401 if _TOKEN_SHAPE_RE.fullmatch(token) else 404
            raise ApiError(status, "Unauthorized" if status == 401 else "Not Found")
        fault = self._take_fault(method)
        if fault is not None:
            description = fault.description or _default_description(fault.status, fault.retry_after)
            retry_after = fault.retry_after if fault.status == 429 else None
            raise ApiError(fault.status, description, retry_after)
        handler = self._methods.get(method.lower())
        if handler is None:
            raise ApiError(404, "Not Found")
        result = handler(params)
        if inspect.isawaitable(result):
            result = await result
        return _json_response(200, {"ok": True, "result": result})

    def _take_fault(self, method: str) -> _Fault | None:
        for fault in self._faults:
            if fault.method == method.lower() and fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _method_table(self) -> dict[str, Callable[[JSONDict], Any]]:
        table: dict[str, Callable[[JSONDict], Any]] = {
            "getMe": self._get_me,
            "getUpdates": self._get_updates,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "setMyCommands": self._set_my_commands,
            "getMyCommands": self._get_my_commands,
            "deleteMyCommands": self._delete_my_commands,
            "sendMessage": self._send_message,
            "editMessageText": self._edit_message_text,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "deleteMessage": self._delete_message,
            "sendChatAction": self._send_chat_action,
            "answerCallbackQuery": self._answer_callback_query,
            "setMessageReaction": self._set_message_reaction,
            "getChat": self._get_chat,
        }
        return {name.lower(): handler for name, handler in table.items()}

    # ---- Bot API methods

    def _get_me(self, params: JSONDict) -> JSONDict:
        return {
            **self.bot_user,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
            "can_connect_to_business": False,
            "has_main_web_app": False,
        }

    async def _get_updates(self, params: JSONDict) -> list[JSONDict]:
        offset = int(_number_param(params, "offset"))
        limit = min(max(int(_number_param(params, "limit") or 100), 1), 100)
        timeout = max(_number_param(params, "timeout"), 0.0)
        if "allowed_updates" in params:
            self._set_allowed_updates(params["allowed_updates"])
        self._confirm(offset)
        for older in self._polls:  # Telegram answers the older request with 409
            older.terminated = True
            older.event.set()
        poll = _Poll()
        self._polls.add(poll)
        try:
            return await self._long_poll(poll, limit, timeout)
        finally:
            self._polls.discard(poll)

    async def _long_poll(self, poll: _Poll, limit: int, timeout: float) -> list[JSONDict]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if poll.terminated:
                raise ApiError(409, GET_UPDATES_CONFLICT)
            remaining = deadline - loop.time()
            if self._pending or self._closed or remaining <= 0:
                return copy.deepcopy(self._pending[:limit])
            poll.event.clear()
            try:
                await asyncio.wait_for(poll.event.wait(), remaining)
            except TimeoutError:
                pass

    def _confirm(self, offset: int) -> None:
        if offset > 0:
            self._pending = [u for u in self._pending if u["update_id"] >= offset]
        elif offset < 0:  # -N: keep the last N updates, forget the rest
            self._pending = self._pending[offset:]

    def _set_allowed_updates(self, allowed: Any) -> None:
        if isinstance(allowed, str):
            raise bad_request("can't parse allowed updates JSON object")
        if not isinstance(allowed, list):
            return
        chosen = frozenset(str(kind) for kind in allowed) & ALL_UPDATE_TYPES
        self._allowed_updates = chosen or DEFAULT_ALLOWED_UPDATES

    def _delete_webhook(self, params: JSONDict) -> bool:
        if params.get("drop_pending_updates"):
            self._pending.clear()
        return True

    def _get_webhook_info(self, params: JSONDict) -> JSONDict:
        pending = len(self._pending)
        return {"url": "", "has_custom_certificate": False, "pending_update_count": pending}

    @staticmethod
    def _commands_key(params: JSONDict) -> tuple[str, str]:
        scope = params.get("scope") or {"type": "default"}
        if not isinstance(scope, dict):
            raise bad_request("can't parse BotCommandScope JSON object")
        return json.dumps(scope, sort_keys=True), str(params.get("language_code") or "")

    def _set_my_commands(self, params: JSONDict) -> bool:
        commands = params.get("commands")
        if commands in (None, ""):
            commands = []
        if not isinstance(commands, list):
            raise bad_request("can't parse commands JSON object")
        if len(commands) > 100:
            raise bad_request("too many commands specified")
        cleaned = [self._checked_command(command) for command in commands]
        self._commands[self._commands_key(params)] = cleaned
        return True

    @staticmethod
    def _checked_command(command: Any) -> JSONDict:
        """tdlib strips one leading '/', checks lengths; the server checks the characters."""
        if not isinstance(command, dict):
            raise bad_request("can't parse BotCommand: expected an Object")
        name, description = command.get("command"), command.get("description")
        if not isinstance(name, str) or not isinstance(description, str):
            raise bad_request('can\'t parse BotCommand: Field "command" must be of type String')
        name, description = name.removeprefix("/").strip(), description.strip()
        if not name:
            raise bad_request("command must be non-empty")
        if len(name) > 32:
            raise bad_request("command length must not exceed 32")
        if not description:
            raise bad_request("command description must be non-empty")
        if len(description) > 256:
            raise bad_request("command description length must not exceed 256")
        if not _COMMAND_RE.fullmatch(name):
            raise bad_request("BOT_COMMAND_INVALID")
        return {"command": name, "description": description}

    def _get_my_commands(self, params: JSONDict) -> list[JSONDict]:
        return copy.deepcopy(self._commands.get(self._commands_key(params), []))

    def _delete_my_commands(self, params: JSONDict) -> bool:
        self._commands.pop(self._commands_key(params), None)
        return True

    def _send_message(self, params: JSONDict) -> JSONDict:
        text, entities = self._formatted_text(params)
        markup = _inline_markup(params.get("reply_markup"), require_inline=False)
        chat_id = self._chat_id(params)
        text, entities = self._stored_text(text, entities)
        reply_to = self._reply_target(chat_id, params)
        message = self._store(chat_id, self.bot_user, True, text, entities, markup, reply_to)
        return self._message_dict(message)

    def _edit_message_text(self, params: JSONDict) -> JSONDict:
        text, entities = self._formatted_text(params)
        markup = _inline_markup(params.get("reply_markup"), require_inline=True)
        message = self._message_to_edit(params)
        text, entities = self._stored_text(text, entities)
        # Omitting reply_markup removes the keyboard, so it counts as a change too.
        if (text, entities, markup) == (message.text, message.entities, message.reply_markup):
            raise ApiError(400, NOT_MODIFIED)
        message.text, message.entities = text, entities
        message.history.append(text)
        return self._apply_edit(message, markup)

    def _edit_message_reply_markup(self, params: JSONDict) -> JSONDict:
        markup = _inline_markup(params.get("reply_markup"), require_inline=True)
        message = self._message_to_edit(params)
        if markup == message.reply_markup:
            raise ApiError(400, NOT_MODIFIED)
        return self._apply_edit(message, markup)

    def _apply_edit(self, message: _StoredMessage, markup: JSONDict | None) -> JSONDict:
        message.reply_markup = markup
        message.edit_count += 1
        message.edit_date = int(time.time())
        return self._message_dict(message)

    def _delete_message(self, params: JSONDict) -> bool:
        chat_id = self._chat_id(params)
        message_id = _int_param(params, "message_id", "message identifier is not specified")
        message = self._live_message(chat_id, message_id)
        if message is None:
            raise bad_request("message to delete not found")
        message.deleted = True
        return True

    def _send_chat_action(self, params: JSONDict) -> bool:
        self._chat_id(params)
        if str(params.get("action") or "").lower() not in _CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        return True

    def _answer_callback_query(self, params: JSONDict) -> bool:
        query_id = str(params.get("callback_query_id") or "")
        if self._open_callbacks.pop(query_id, None) is None:
            raise ApiError(400, QUERY_ID_INVALID)
        keys = ("text", "show_alert", "url", "cache_time")
        self._callback_answers[query_id] = {key: params[key] for key in keys if key in params}
        return True

    def _set_message_reaction(self, params: JSONDict) -> bool:
        chat_id = self._chat_id(params)
        message_id = _int_param(params, "message_id", "message identifier is not specified")
        message = self._live_message(chat_id, message_id)
        if message is None:
            raise bad_request("message to react not found")
        reaction = params.get("reaction") or []
        if not isinstance(reaction, list):
            raise bad_request("expected an Array of ReactionType")
        message.reaction = copy.deepcopy(reaction)
        return True

    def _get_chat(self, params: JSONDict) -> JSONDict:
        chat = self._chats[self._chat_id(params)]
        return {**copy.deepcopy(chat), "accent_color_id": 0, "max_reaction_count": 11}

    # ---- method building blocks

    def _formatted_text(self, params: JSONDict) -> tuple[str, list[JSONDict]]:
        """Text as the Bot API reads it (before any chat lookup): raw checks and parsing."""
        raw = params.get("text")
        if raw is None or raw == "":
            raise bad_request("message text is empty")
        raw = raw if isinstance(raw, str) else json.dumps(raw)
        mode = str(params.get("parse_mode") or "").lower()
        if mode in ("", "none"):
            entities = params.get("entities") or []
            if not isinstance(entities, list):
                raise bad_request("can't parse entities JSON object")
            return raw, entities
        if mode not in _PARSERS:
            raise bad_request("unsupported parse_mode")
        try:
            return parse_formatted_text(raw, mode)
        except EntityParseError as error:
            raise bad_request(f"can't parse entities: {error}") from None

    def _stored_text(self, text: str, entities: list[JSONDict]) -> tuple[str, list[JSONDict]]:
        """What Telegram keeps, with its 4096 code point limit (see the module docstring)."""
        text, entities = finalize_text(text, entities)
        if len(text) > MAX_TEXT_LENGTH:
            raise bad_request("message is too long")
        for entity in entities:
            if entity["type"] == "text_mention":
                user_id = int(entity["user"]["id"])
                unknown = {"id": user_id, "is_bot": False, "first_name": ""}
                entity["user"] = copy.deepcopy(self._users.get(user_id, unknown))
        return text, entities

    def _chat_id(self, params: JSONDict) -> int:
        raw = params.get("chat_id")
        if raw is None or raw == "":
            raise bad_request("chat_id is empty")
        if isinstance(raw, str) and raw.startswith("@"):
            named = [cid for cid, chat in self._chats.items() if chat.get("username") == raw[1:]]
            raw = named[0] if named else None
        if isinstance(raw, int) and raw in self._migrated:
            raise ApiError(
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
                migrate_to_chat_id=self._migrated[raw],
            )
        if not isinstance(raw, int) or raw not in self._chats:
            raise bad_request("chat not found")
        return raw

    def _message_to_edit(self, params: JSONDict) -> _StoredMessage:
        if params.get("inline_message_id"):
            raise bad_request("message to edit not found")
        chat_id = self._chat_id(params)
        message_id = _int_param(params, "message_id", "message identifier is not specified")
        message = self._live_message(chat_id, message_id)
        if message is None:
            raise bad_request("message to edit not found")
        if not message.from_bot:
            raise bad_request("message can't be edited")
        return message

    def _reply_target(self, chat_id: int, params: JSONDict) -> int | None:
        """reply_parameters (PTB 22) or legacy reply_to_message_id; must exist unless allowed."""
        reply = params.get("reply_parameters")
        allow_missing = bool(params.get("allow_sending_without_reply"))
        target: Any = None
        if isinstance(reply, dict):
            target = reply.get("message_id")
            allow_missing = bool(reply.get("allow_sending_without_reply", allow_missing))
        elif params.get("reply_to_message_id") not in (None, ""):
            target = params["reply_to_message_id"]
        if target is None:
            return None
        if self._live_message(chat_id, int(target)) is None:
            if allow_missing:
                return None
            raise bad_request("message to be replied not found")
        return int(target)

    # ---- state

    def _register_user(self, user_id: int, first_name: str, username: str | None) -> JSONDict:
        user: JSONDict = {"id": user_id, "is_bot": False, "first_name": first_name}
        if username:
            user["username"] = username
        user["language_code"] = "en"
        self._users[user_id] = user
        return copy.deepcopy(user)

    def _register_chat(
        self,
        chat_id: int,
        chat_type: ChatType,
        title: str | None,
        first_name: str,
        username: str | None,
    ) -> JSONDict:
        known = self._chats.get(chat_id)
        if known is not None and known["type"] != chat_type:
            raise ValueError(f"chat {chat_id} is a {known['type']} chat, not {chat_type}")
        if chat_type == "private":
            chat: JSONDict = {"id": chat_id, "first_name": first_name, "type": "private"}
            if username:
                chat["username"] = username
        else:
            if chat_id >= 0:
                raise ValueError("group and supergroup chat ids are negative")
            default_title = known["title"] if known else "Test Group"
            chat = {"id": chat_id, "title": title or default_title, "type": chat_type}
        self._chats[chat_id] = chat
        return copy.deepcopy(chat)

    def _store(
        self,
        chat_id: int,
        sender: JSONDict,
        from_bot: bool,
        text: str,
        entities: list[JSONDict],
        markup: JSONDict | None,
        reply_to: int | None,
    ) -> _StoredMessage:
        """Bot and user messages share one id sequence per chat, as in Telegram groups."""
        message_id = self._last_message_id.get(chat_id, 0) + 1
        self._last_message_id[chat_id] = message_id
        message = _StoredMessage(
            chat_id=chat_id,
            message_id=message_id,
            sender=copy.deepcopy(sender),
            from_bot=from_bot,
            text=text,
            entities=copy.deepcopy(entities),
            reply_markup=copy.deepcopy(markup),
            date=int(time.time()),
            reply_to_message_id=reply_to,
            history=[text],
        )
        self._messages.setdefault(chat_id, {})[message_id] = message
        return message

    def _live_message(self, chat_id: int, message_id: int) -> _StoredMessage | None:
        message = self._messages.get(chat_id, {}).get(message_id)
        return message if message is not None and not message.deleted else None

    def _message_dict(self, message: _StoredMessage, *, with_reply: bool = True) -> JSONDict:
        """The Message object Telegram sends; a reply carries the full replied-to message."""
        result: JSONDict = {
            "message_id": message.message_id,
            "from": copy.deepcopy(message.sender),
            "chat": copy.deepcopy(self._chats[message.chat_id]),
            "date": message.date,
        }
        if message.edit_date is not None:
            result["edit_date"] = message.edit_date
        target = (
            self._live_message(message.chat_id, message.reply_to_message_id)
            if with_reply and message.reply_to_message_id is not None
            else None
        )
        if target is not None:
            result["reply_to_message"] = self._message_dict(target, with_reply=False)
        result["text"] = message.text
        if message.entities:
            result["entities"] = copy.deepcopy(message.entities)
        if message.reply_markup:
            result["reply_markup"] = copy.deepcopy(message.reply_markup)
        return result

    @staticmethod
    def _snapshot(message: _StoredMessage) -> BotMessage:
        return BotMessage(
            chat_id=message.chat_id,
            message_id=message.message_id,
            text=message.text,
            entities=tuple(copy.deepcopy(message.entities)),
            reply_markup=copy.deepcopy(message.reply_markup),
            edit_count=message.edit_count,
            history=tuple(message.history),
            date=message.date,
            edit_date=message.edit_date,
            reply_to_message_id=message.reply_to_message_id,
            reaction=tuple(copy.deepcopy(message.reaction)),
        )


__all__ = [
    "ALL_UPDATE_TYPES",
    "ApiCall",
    "ApiError",
    "BotMessage",
    "DEFAULT_TOKEN",
    "EntityParseError",
    "FakeTelegram",
    "MAX_TEXT_LENGTH",
    "detect_entities",
    "finalize_text",
    "parse_formatted_text",
    "utf16_len",
]
