"""In-process fake of Discord's HTTP API (v10) and gateway, for tests only.

The REAL discord.py library connects to it over loopback.  Point discord.py at
it before ``Client.login``/``Client.start``::

    discord.http.Route.BASE = fake.api_base                      # ".../api/v10"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)

``patched_discord_py(fake)`` does exactly that and restores the originals.
Interaction callbacks and follow-ups go through ``discord.webhook.async_``,
which builds its URLs from the same ``Route.BASE``; READY's
``resume_gateway_url`` and ``GET /gateway/bot`` point back at this fake, so
nothing else has to be patched.

Fidelity notes (each one is a real Discord behaviour a bot can trip over):

* Responses carry ``Content-Type: application/json`` exactly; discord.py
  treats anything else (even ``; charset=utf-8``) as plain text.
* 429 responses carry a ``Via`` header; without it discord.py assumes a
  Cloudflare ban and raises instead of retrying.
* The gateway speaks ``zlib-stream`` transport compression when asked
  (discord.py asks for it unless ``zstandard`` is installed); otherwise text.
* The bot's own messages, edits and reactions are echoed over the gateway,
  as Discord does, so a bot that does not ignore itself will loop.
* Without the MESSAGE_CONTENT intent, guild messages that neither mention
  the bot nor were written by it arrive with empty content/embeds.
* Interaction callbacks later than 3 s fail with 10062 Unknown interaction;
  the first follow-up after a deferred (type 5) ack *resolves* the
  "thinking" message instead of creating a new one, and its ephemeral flag
  is ignored (ephemerality was fixed by the ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import inspect
import json
import math
import re
import secrets
import socket
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

JSON = dict[str, Any]
Snowflake = str | int
UserRef = Mapping[str, Any] | str | int  # user object, user id, or username
ChannelSpec = str | Mapping[str, Any]
RoleSpec = str | Mapping[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BodyAndFiles = tuple[Any, list[JSON]]

API_VERSION = 10
API_PREFIX = f"/api/v{API_VERSION}"
GATEWAY_PATH = "/gateway"
DISCORD_EPOCH_MS = 1_420_070_400_000
DEFAULT_HEARTBEAT_MS = 41_250
INTERACTION_ACK_WINDOW_S = 3.0
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

# Message limits Discord enforces on create/edit.
CONTENT_MAX = 2000
EMBEDS_MAX = 10
EMBED_TITLE_MAX = 256
EMBED_DESCRIPTION_MAX = 4096
EMBED_FIELDS_MAX = 25
EMBED_FIELD_NAME_MAX = 256
EMBED_FIELD_VALUE_MAX = 1024
EMBED_FOOTER_MAX = 2048
EMBED_AUTHOR_MAX = 256
EMBED_TOTAL_MAX = 6000
COMMANDS_MAX = 100
COMMAND_OPTIONS_MAX = 25

# Parsed request body (JSON or multipart payload_json) plus uploaded-file metadata.
_BODY_KEY: web.RequestKey[BodyAndFiles] = web.RequestKey("fake_discord_body", tuple)

FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

MSG_DEFAULT = 0
MSG_REPLY = 19
MSG_CHAT_INPUT_COMMAND = 20

CH_TEXT, CH_DM, CH_VOICE, CH_CATEGORY, CH_NEWS = 0, 1, 2, 4, 5
CH_PUBLIC_THREAD, CH_PRIVATE_THREAD, CH_FORUM = 11, 12, 15
MESSAGEABLE_CHANNELS = {CH_TEXT, CH_DM, CH_VOICE, CH_NEWS, 10, CH_PUBLIC_THREAD, CH_PRIVATE_THREAD}
THREAD_PARENTS = {CH_TEXT, CH_NEWS, CH_FORUM}

OPT_SUB_COMMAND, OPT_SUB_COMMAND_GROUP = 1, 2
OPT_STRING, OPT_INTEGER, OPT_BOOLEAN, OPT_USER, OPT_CHANNEL, OPT_ROLE, OPT_NUMBER = (
    3,
    4,
    5,
    6,
    7,
    8,
    10,
)

# Gateway close codes (https://discord.com/developers/docs/topics/opcodes-and-status-codes).
CLOSE_UNKNOWN_OPCODE = 4001
CLOSE_DECODE_ERROR = 4002
CLOSE_NOT_AUTHENTICATED = 4003
CLOSE_AUTH_FAILED = 4004
CLOSE_ALREADY_AUTHENTICATED = 4005
CLOSE_INVALID_API_VERSION = 4012
CLOSE_INVALID_INTENTS = 4013
CLOSE_DISALLOWED_INTENTS = 4014


class Intents:
    """Gateway intent bits the fake filters events by."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    GUILD_MESSAGE_REACTIONS = 1 << 10
    GUILD_MESSAGE_TYPING = 1 << 11
    DIRECT_MESSAGES = 1 << 12
    DIRECT_MESSAGE_REACTIONS = 1 << 13
    DIRECT_MESSAGE_TYPING = 1 << 14
    MESSAGE_CONTENT = 1 << 15
    PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT


class Permissions:
    """Permission bits used to build plausible roles."""

    ADMINISTRATOR = 1 << 3
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    USE_EXTERNAL_EMOJIS = 1 << 18
    USE_APPLICATION_COMMANDS = 1 << 31
    MANAGE_THREADS = 1 << 34
    CREATE_PUBLIC_THREADS = 1 << 35
    SEND_MESSAGES_IN_THREADS = 1 << 38
    ALL = (1 << 51) - 1
    EVERYONE_DEFAULT = (
        ADD_REACTIONS
        | VIEW_CHANNEL
        | SEND_MESSAGES
        | EMBED_LINKS
        | ATTACH_FILES
        | READ_MESSAGE_HISTORY
        | USE_EXTERNAL_EMOJIS
        | USE_APPLICATION_COMMANDS
        | CREATE_PUBLIC_THREADS
        | SEND_MESSAGES_IN_THREADS
    )
    BOT_DEFAULT = EVERYONE_DEFAULT | MANAGE_MESSAGES | MANAGE_THREADS


# Application flags Discord sets when a privileged intent is enabled in the portal.
_APP_FLAG_FOR_INTENT = {
    Intents.GUILD_PRESENCES: 1 << 13,
    Intents.GUILD_MEMBERS: 1 << 15,
    Intents.MESSAGE_CONTENT: 1 << 19,
}

_UNKNOWN = {
    "application": (10002, "Unknown Application"),
    "channel": (10003, "Unknown Channel"),
    "guild": (10004, "Unknown Guild"),
    "message": (10008, "Unknown Message"),
    "user": (10013, "Unknown User"),
    "emoji": (10014, "Unknown Emoji"),
    "webhook": (10015, "Unknown Webhook"),
    "member": (10007, "Unknown Member"),
    "interaction": (10062, "Unknown interaction"),
}


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One REST call as the fake saw it (path is relative to ``api_base``)."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    timestamp: float
    status: int = 0
    files: list[str] = field(default_factory=list)


@dataclass
class FakeMessage:
    """A message as stored by the fake; mutated in place by edits."""

    id: str
    channel_id: str
    guild_id: str | None
    author: JSON
    content: str = ""
    embeds: list[JSON] = field(default_factory=list)
    attachments: list[JSON] = field(default_factory=list)
    components: list[JSON] = field(default_factory=list)
    flags: int = 0
    type: int = MSG_DEFAULT
    message_reference: JSON | None = None
    mentions: list[str] = field(default_factory=list)
    mention_roles: list[str] = field(default_factory=list)
    timestamp: str = ""
    edited_timestamp: str | None = None
    edit_count: int = 0
    content_history: list[str] = field(default_factory=list)
    deleted: bool = False
    reactions: list[tuple[str, str]] = field(default_factory=list)
    webhook_id: str | None = None
    interaction_id: str | None = None
    interaction_metadata: JSON | None = None
    nonce: str | int | None = None
    tts: bool = False
    sticker_ids: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.monotonic)

    @property
    def author_id(self) -> str:
        return str(self.author["id"])

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while this is a deferred interaction's "thinking..." message."""
        return bool(self.flags & FLAG_LOADING)

    @property
    def is_reply(self) -> bool:
        return self.message_reference is not None

    @property
    def reply_to_id(self) -> str | None:
        return None if self.message_reference is None else self.message_reference.get("message_id")


@dataclass
class InteractionRecord:
    """An INTERACTION_CREATE the fake sent and everything the bot did with it."""

    id: str
    token: str
    command_name: str
    user_id: str
    channel_id: str
    guild_id: str | None
    dispatched_at: float = 0.0
    callback_type: int | None = None
    callback_at: float | None = None
    callback_data: JSON | None = None
    ephemeral: bool = False
    original: FakeMessage | None = None
    followups: list[FakeMessage] = field(default_factory=list)
    late_callbacks: int = 0
    ack_window: float = INTERACTION_ACK_WINDOW_S

    @property
    def ack_latency(self) -> float | None:
        return None if self.callback_at is None else self.callback_at - self.dispatched_at

    @property
    def acked_in_time(self) -> bool:
        """Whether the callback arrived within the ack window (Discord: 3 s)."""
        latency = self.ack_latency
        return latency is not None and latency <= self.ack_window

    @property
    def deferred(self) -> bool:
        return self.callback_type == 5

    @property
    def messages(self) -> list[FakeMessage]:
        """Original response (if any) followed by follow-ups, deleted ones excluded."""
        found = ([self.original] if self.original else []) + self.followups
        return [m for m in found if not m.deleted]


@dataclass
class InjectedRateLimit:
    method: str
    pattern: re.Pattern[str]
    retry_after: float
    remaining: int
    global_: bool
    hits: int = 0
    via: bool = True  # False: like a proxy/Cloudflare 429, which discord.py does not retry


@dataclass
class _RouteLimit:
    """A real token bucket for one route, keyed by the concrete path."""

    method: str
    pattern: re.Pattern[str]
    limit: int
    per: float
    bucket: str
    windows: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class FakeGuild:
    """A guild in the fake world.  Channel/role dicts are Discord objects."""

    id: str
    name: str
    owner_id: str
    joined_at: str
    bot_role_id: str = ""
    channels: dict[str, JSON] = field(default_factory=dict)
    roles: dict[str, JSON] = field(default_factory=dict)
    members: dict[str, JSON] = field(default_factory=dict)
    threads: dict[str, JSON] = field(default_factory=dict)

    def channel_id(self, name: str) -> str:
        for channel in list(self.channels.values()) + list(self.threads.values()):
            if channel["name"] == name:
                return str(channel["id"])
        raise KeyError(f"guild {self.name!r} has no channel named {name!r}")

    def role_id(self, name: str) -> str:
        for role in self.roles.values():
            if role["name"] == name:
                return str(role["id"])
        raise KeyError(f"guild {self.name!r} has no role named {name!r}")

    @property
    def text_channel_id(self) -> str:
        """The first plain text (thread-capable) channel."""
        return next(str(c["id"]) for c in self.channels.values() if c["type"] == CH_TEXT)


@dataclass(eq=False)  # identity semantics: connections live in a set
class _GatewayConnection:
    ws: web.WebSocketResponse
    compressor: Any | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: _GatewaySession | None = None
    server_closed: bool = False


@dataclass(eq=False)
class _GatewaySession:
    session_id: str
    intents: int
    shard: list[int]
    seq: int = 0
    buffer: deque[JSON] = field(default_factory=lambda: deque(maxlen=2000))
    connection: _GatewayConnection | None = None
    invalidated: bool = False


class _ApiError(Exception):
    """Raised by handlers; turned into Discord's error response by the middleware."""

    def __init__(self, status: int, body: JSON, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, status: int, code: int, message: str, errors: JSON | None = None) -> _ApiError:
        body: JSON = {"message": message, "code": code}
        if errors:
            body["errors"] = errors
        return cls(status, body)

    @classmethod
    def unknown(cls, kind: str) -> _ApiError:
        code, message = _UNKNOWN[kind]
        return cls.of(404, code, message)

    @classmethod
    def invalid_form(cls, errors: JSON) -> _ApiError:
        return cls.of(400, 50035, "Invalid Form Body", errors)

    def to_response(self) -> web.Response:
        return _json_response(self.body, self.status, self.headers)


# --------------------------------------------------------------------------- helpers


def _json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    # discord.py's json_or_text only parses bodies whose Content-Type is exactly
    # "application/json"; aiohttp's json_response would append "; charset=utf-8".
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    return web.Response(status=status, body=json.dumps(data).encode(), headers=all_headers)


def _no_content() -> web.Response:
    return web.Response(status=204)


def _iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _error_list(code: str, message: str) -> JSON:
    return {"_errors": [{"code": code, "message": message}]}


def _max_length_error(limit: int) -> JSON:
    return _error_list("BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")


def _check_length(errors: JSON, key: str, value: Any, limit: int) -> None:
    if isinstance(value, str) and len(value) > limit:
        errors[key] = _max_length_error(limit)


class _SnowflakeFactory:
    """Realistic, strictly increasing snowflakes (discord.py's mention regex needs 15-20 digits)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> str:
        candidate = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(candidate, self._last + 1)
        return str(self._last)


# --------------------------------------------------------------------------- validation


def embed_length(embed: Mapping[str, Any]) -> int:
    """Characters Discord counts toward the 6000-per-message embed budget."""
    fields = embed.get("fields") or []
    parts = [
        embed.get("title"),
        embed.get("description"),
        (embed.get("footer") or {}).get("text"),
        (embed.get("author") or {}).get("name"),
    ]
    parts += [f.get("name") for f in fields] + [f.get("value") for f in fields]
    return sum(len(p) for p in parts if isinstance(p, str))


def _embed_field_errors(fields: Sequence[Mapping[str, Any]]) -> JSON | None:
    if len(fields) > EMBED_FIELDS_MAX:
        return _max_length_error(EMBED_FIELDS_MAX)
    errors: JSON = {}
    for index, item in enumerate(fields):
        item_errors: JSON = {}
        _check_length(item_errors, "name", item.get("name"), EMBED_FIELD_NAME_MAX)
        _check_length(item_errors, "value", item.get("value"), EMBED_FIELD_VALUE_MAX)
        if item_errors:
            errors[str(index)] = item_errors
    return errors or None


def _embed_errors(embed: Mapping[str, Any]) -> JSON:
    errors: JSON = {}
    _check_length(errors, "title", embed.get("title"), EMBED_TITLE_MAX)
    _check_length(errors, "description", embed.get("description"), EMBED_DESCRIPTION_MAX)
    footer_errors: JSON = {}
    _check_length(footer_errors, "text", (embed.get("footer") or {}).get("text"), EMBED_FOOTER_MAX)
    if footer_errors:
        errors["footer"] = footer_errors
    author_errors: JSON = {}
    _check_length(author_errors, "name", (embed.get("author") or {}).get("name"), EMBED_AUTHOR_MAX)
    if author_errors:
        errors["author"] = author_errors
    field_errors = _embed_field_errors(embed.get("fields") or [])
    if field_errors:
        errors["fields"] = field_errors
    return errors


def _embeds_errors(embeds: Sequence[Mapping[str, Any]]) -> JSON | None:
    if len(embeds) > EMBEDS_MAX:
        return _max_length_error(EMBEDS_MAX)
    per_embed = {
        str(i): errs for i, errs in ((i, _embed_errors(e)) for i, e in enumerate(embeds)) if errs
    }
    if per_embed:
        return per_embed
    if sum(embed_length(e) for e in embeds) > EMBED_TOTAL_MAX:
        return _error_list(
            "MAX_EMBED_SIZE_EXCEEDED", f"Embed size exceeds maximum size of {EMBED_TOTAL_MAX}"
        )
    return None


def message_payload_errors(payload: Mapping[str, Any]) -> JSON:
    """Discord's nested ``errors`` object for a message create/edit body; empty when valid."""
    errors: JSON = {}
    content = payload.get("content")
    if content is not None and not isinstance(content, str):
        errors["content"] = _error_list("BASE_TYPE_STRING", "Must be a string.")
    else:
        _check_length(errors, "content", content, CONTENT_MAX)
    embeds = payload.get("embeds")
    if embeds:
        embed_errors = _embeds_errors(embeds)
        if embed_errors:
            errors["embeds"] = embed_errors
    return errors


_COMMAND_NAME_RE = re.compile(r"^[-_\w]{1,32}$")


def _command_name_errors(name: Any, *, chat_input: bool) -> JSON | None:
    if chat_input:
        valid = (
            isinstance(name, str) and bool(_COMMAND_NAME_RE.match(name)) and name == name.lower()
        )
    else:
        valid = isinstance(name, str) and 1 <= len(name) <= 32
    return (
        None
        if valid
        else _error_list("APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
    )


def _description_errors(description: Any) -> JSON | None:
    if isinstance(description, str) and 1 <= len(description) <= 100:
        return None
    return _error_list("BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")


def _option_errors(options: Sequence[Mapping[str, Any]]) -> JSON | None:
    if len(options) > COMMAND_OPTIONS_MAX:
        return _max_length_error(COMMAND_OPTIONS_MAX)
    errors: JSON = {}
    seen_optional = False
    for index, option in enumerate(options):
        option_errors: JSON = {}
        name_error = _command_name_errors(option.get("name"), chat_input=True)
        if name_error:
            option_errors["name"] = name_error
        description_error = _description_errors(option.get("description"))
        if description_error:
            option_errors["description"] = description_error
        if option.get("type") in (OPT_SUB_COMMAND, OPT_SUB_COMMAND_GROUP):
            nested = _option_errors(option.get("options") or [])
            if nested:
                option_errors["options"] = nested
        elif option.get("required"):
            if seen_optional:
                option_errors["required"] = _error_list(
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                    "Required options must be placed before non-required options",
                )
        else:
            seen_optional = True
        if option_errors:
            errors[str(index)] = option_errors
    return errors or None


def command_errors(command: Mapping[str, Any]) -> JSON:
    """Discord's ``errors`` object for one application command definition."""
    chat_input = command.get("type", 1) == 1
    errors: JSON = {}
    name_error = _command_name_errors(command.get("name"), chat_input=chat_input)
    if name_error:
        errors["name"] = name_error
    if chat_input:
        description_error = _description_errors(command.get("description"))
        if description_error:
            errors["description"] = description_error
        option_errors = _option_errors(command.get("options") or [])
        if option_errors:
            errors["options"] = option_errors
    return errors


def _parse_emoji(raw: str) -> JSON:
    """Route emoji ("👍" or "name:id") to a partial emoji; ASCII words are not emoji."""
    custom = re.fullmatch(r"<?a?:?([\w~]+):(\d{15,20})>?", raw)
    if custom:
        return {"id": custom.group(2), "name": custom.group(1)}
    if not raw or re.fullmatch(r"[\x00-\x7f]+", raw):
        raise _ApiError.of(400, 10014, "Unknown Emoji")
    return {"id": None, "name": raw}


def _emoji_key(emoji: Mapping[str, Any]) -> str:
    return f"{emoji['name']}:{emoji['id']}" if emoji.get("id") else str(emoji["name"])


def _infer_option_type(value: Any) -> int:
    if isinstance(value, bool):
        return OPT_BOOLEAN
    if isinstance(value, int):
        return OPT_INTEGER
    if isinstance(value, float):
        return OPT_NUMBER
    return OPT_STRING


def _describe(predicate: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)


# --------------------------------------------------------------------------- the fake


class FakeDiscord:
    """Fake Discord REST API + gateway on 127.0.0.1 (random free port).

    World state (guilds, users, messages, commands, interactions) is plain
    Python you can inspect; user actions (``user_message``, ``slash_command``,
    ``add_reaction``) are dispatched over the gateway to every connected bot.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        bot_username: str = "lorabot",
        heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_MS,
        interaction_ack_timeout: float = INTERACTION_ACK_WINDOW_S,
        privileged_intents: int = Intents.PRIVILEGED,
        echo_bot_events: bool = True,
    ) -> None:
        self._ids = _SnowflakeFactory()
        self._users: dict[str, JSON] = {}
        self.bot_user: JSON = self._new_user(bot_username, bot=True)
        self.owner_user: JSON = self._new_user(f"{bot_username}-owner")
        self.application_id: str = self.bot_user[
            "id"
        ]  # Discord gives modern bots app id == bot user id
        self.token: str = (
            token
            or f"{secrets.token_urlsafe(18)}.{secrets.token_urlsafe(4)}.{secrets.token_urlsafe(27)}"
        )
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.interaction_ack_timeout = interaction_ack_timeout
        self.privileged_intents = privileged_intents
        self.echo_bot_events = echo_bot_events
        self.presence_updates: list[JSON] = []
        self.identify_count = 0
        self.gateway_urls: list[
            str
        ] = []  # path+query of every gateway connection (v, encoding, compress)
        self.resume_count = 0
        self._guilds: dict[str, FakeGuild] = {}
        self._channels: dict[str, JSON] = {}
        self._dm_by_user: dict[str, str] = {}
        self._messages: dict[str, FakeMessage] = {}
        self._channel_log: dict[str, list[str]] = {}
        self._nonces: dict[tuple[str, str], str] = {}
        self._attachment_data: dict[str, bytes] = {}
        self._commands: dict[str | None, list[JSON]] = {}
        self._command_ids: dict[tuple[str | None, str, int], str] = {}
        self._interactions: dict[str, InteractionRecord] = {}
        self._interactions_by_token: dict[str, InteractionRecord] = {}
        self._requests: list[RecordedRequest] = []
        self._injected: list[InjectedRateLimit] = []
        self._route_limits: list[_RouteLimit] = []
        self._sessions: dict[str, _GatewaySession] = {}
        self._connections: set[_GatewayConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application(middlewares=[self._api_middleware])
        app.router.add_get(GATEWAY_PATH, self._gateway_handler)
        app.router.add_get(
            "/attachments/{channel_id}/{attachment_id}/{filename}", self._get_attachment
        )
        for method, path, handler in self._routes():
            app.router.add_route(method, API_PREFIX + path, handler)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self._changed = asyncio.Event()

    async def stop(self) -> None:
        for connection in list(self._connections):
            await self._close_connection(connection, 1001, "fake discord shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeDiscord.start() has not been awaited")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{GATEWAY_PATH}"

    # ------------------------------------------------------------------ world building

    def add_user(self, username: str, *, bot: bool = False, global_name: str | None = None) -> JSON:
        """Register a user and return its Discord user object (a copy)."""
        return dict(self._new_user(username, bot=bot, global_name=global_name))

    def add_guild(
        self,
        name: str,
        channels: Sequence[ChannelSpec] | None = None,
        roles: Sequence[RoleSpec] | None = None,
        *,
        owner: UserRef | None = None,
    ) -> FakeGuild:
        """Create a guild the bot is in.  Channels default to one text channel, "general".

        Channel specs are names (text channels) or partial channel objects
        (``{"name": "voice", "type": 2}``); role specs are names or partial
        role objects.  If a bot is already connected it gets GUILD_CREATE.
        """
        owner_user = (
            self._user(owner)
            if owner is not None
            else self._new_user(f"{name}-owner".replace(" ", "-"))
        )
        guild = FakeGuild(
            id=self._ids.next(), name=name, owner_id=owner_user["id"], joined_at=_iso_now()
        )
        guild.roles[guild.id] = self._role_object(
            guild.id, "@everyone", Permissions.EVERYONE_DEFAULT, 0
        )
        guild.bot_role_id = self._ids.next()
        bot_role = self._role_object(
            guild.bot_role_id, self.bot_user["username"], Permissions.BOT_DEFAULT, 1
        )
        bot_role.update(managed=True, tags={"bot_id": self.bot_user["id"]})
        guild.roles[guild.bot_role_id] = bot_role
        for spec in roles or ():
            self._add_role(guild, spec)
        for spec in channels if channels is not None else ("general",):
            self._add_channel(guild, spec)
        self._guilds[guild.id] = guild
        self._put_member(guild, self.bot_user["id"], [guild.bot_role_id])
        self._put_member(guild, owner_user["id"], [])
        self._spawn_dispatch(
            "GUILD_CREATE", lambda: self._guild_create_payload(guild, newly_joined=True)
        )
        return guild

    def add_member(
        self, guild_id: Snowflake, user: UserRef, roles: Sequence[Snowflake] = ()
    ) -> JSON:
        """Add ``user`` to the guild with roles given by id or name; returns the member object."""
        guild = self._guild(guild_id)
        user_obj = self._user(user)
        role_ids = [self._role_ref(guild, r) for r in roles]
        self._put_member(guild, user_obj["id"], role_ids)
        payload = {**self._member_payload(guild, user_obj["id"]), "guild_id": guild.id}
        self._spawn_dispatch("GUILD_MEMBER_ADD", lambda: payload)
        return self._member_payload(guild, user_obj["id"])

    def open_dm(self, user: UserRef) -> str:
        """Id of the DM channel between the bot and ``user`` (created on first use)."""
        return str(self._dm_channel(self._user(user)["id"])["id"])

    def guild(self, guild_id: Snowflake) -> FakeGuild:
        return self._guild(guild_id)

    @property
    def guilds(self) -> list[FakeGuild]:
        return list(self._guilds.values())

    # ------------------------------------------------------------------ simulated users

    async def user_message(
        self,
        channel_id: Snowflake,
        author: UserRef,
        content: str,
        *,
        mentions_bot: bool = False,
        reply_to: Snowflake | FakeMessage | None = None,
        guild_id: Snowflake | None = None,
        embeds: Sequence[JSON] = (),
        attachments: Sequence[tuple[str, bytes]] = (),
        ping_replied_author: bool = True,
    ) -> FakeMessage:
        """A user posts ``content``; dispatches MESSAGE_CREATE and returns the stored message.

        ``author`` is a user object, a user id, or a username (created on
        first use).  ``mentions_bot`` prefixes ``<@botid>`` as the Discord
        client does.  Replies ping the replied-to author unless
        ``ping_replied_author`` is False, like the Discord client's default.
        ``attachments`` are ``(filename, bytes)`` uploads the bot can download.
        """
        channel = self._channel(channel_id)
        user = self._user(author)
        gid = str(guild_id) if guild_id is not None else channel.get("guild_id")
        self._ensure_can_post(channel, gid, user["id"])
        bot_mention = f"<@{self.bot_user['id']}>"
        if mentions_bot and bot_mention not in content:
            content = f"{bot_mention} {content}"
        reference = self._user_reference(channel, gid, reply_to)
        msg = FakeMessage(
            id=self._ids.next(),
            channel_id=str(channel["id"]),
            guild_id=gid,
            author=dict(user),
            content=content,
            embeds=[dict(e, type=e.get("type", "rich")) for e in embeds],
            type=MSG_REPLY if reference else MSG_DEFAULT,
            message_reference=reference,
            timestamp=_iso_now(),
            content_history=[content],
        )
        uploads = [
            {"filename": name, "size": len(data), "data": data, "content_type": None}
            for name, data in attachments
        ]
        msg.attachments = [self._attachment_object(msg.channel_id, u, {}) for u in uploads]
        self._set_mentions(msg, replied_user=ping_replied_author)
        self._store_message(msg)
        await self._dispatch_message("MESSAGE_CREATE", msg)
        return msg

    async def user_edit(self, message_id: Snowflake, content: str) -> FakeMessage:
        """The message's (human) author edits it; dispatches MESSAGE_UPDATE."""
        msg = self.message(message_id)
        msg.content = content
        self._mark_edited(msg)
        self._set_mentions(msg, replied_user=True)
        await self._dispatch_message("MESSAGE_UPDATE", msg)
        return msg

    async def dispatch_raw(self, event: str, data: JSON) -> None:
        """Send any gateway dispatch as is (e.g. an event type a bot does not know yet)."""
        await self._dispatch(event, data)

    def message_payload(self, message_id: Snowflake) -> JSON:
        """A stored message as the gateway would send it (to build raw events from)."""
        return self._message_payload(self.message(message_id))

    async def user_delete(self, message_id: Snowflake) -> None:
        msg = self.message(message_id)
        msg.deleted = True
        await self._dispatch_delete(msg)

    async def add_reaction(
        self, channel_id: Snowflake, message_id: Snowflake, user: UserRef, emoji: str = "👍"
    ) -> None:
        """A user reacts; MESSAGE_REACTION_ADD is raw, so ``message_id`` need not be known."""
        channel = self._channel(channel_id)
        user_obj = self._user(user)
        emoji_obj = _parse_emoji(emoji)
        msg = self._messages.get(str(message_id))
        if msg is not None and (_emoji_key(emoji_obj), user_obj["id"]) not in msg.reactions:
            msg.reactions.append((_emoji_key(emoji_obj), user_obj["id"]))
        payload = self._reaction_payload(channel, str(message_id), user_obj["id"], emoji_obj, msg)
        await self._dispatch("MESSAGE_REACTION_ADD", payload)

    async def remove_reaction(
        self, channel_id: Snowflake, message_id: Snowflake, user: UserRef, emoji: str = "👍"
    ) -> None:
        """A user takes a reaction back: MESSAGE_REACTION_REMOVE (raw; no member object,
        as Discord sends it)."""
        channel = self._channel(channel_id)
        user_obj = self._user(user)
        emoji_obj = _parse_emoji(emoji)
        msg = self._messages.get(str(message_id))
        key = (_emoji_key(emoji_obj), user_obj["id"])
        if msg is not None and key in msg.reactions:
            msg.reactions.remove(key)
        payload = self._reaction_payload(channel, str(message_id), user_obj["id"], emoji_obj, msg)
        payload.pop("member", None)
        payload.pop("message_author_id", None)
        await self._dispatch("MESSAGE_REACTION_REMOVE", payload)

    async def add_thread(
        self,
        channel_id: Snowflake,
        name: str,
        *,
        owner: UserRef | None = None,
        private: bool = False,
    ) -> JSON:
        """A user opens a thread under ``channel_id``; dispatches THREAD_CREATE."""
        parent = self._channel(channel_id)
        owner_id = self._user(owner)["id"] if owner is not None else self.bot_user["id"]
        kind = CH_PRIVATE_THREAD if private else CH_PUBLIC_THREAD
        thread = self._create_thread(parent, self._ids.next(), name, kind, owner_id)
        await self._dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return dict(thread)

    async def slash_command(
        self,
        name: str,
        options: Mapping[str, Any] | Sequence[JSON] | None,
        user: UserRef,
        channel_id: Snowflake,
        guild_id: Snowflake | None = None,
        *,
        locale: str = "en-US",
        allow_unregistered: bool = False,
    ) -> InteractionRecord:
        """A user runs ``/name``; dispatches INTERACTION_CREATE (type 2) and returns its record.

        ``options`` is ``{"option": value}`` (types come from the synced
        command definition) or a raw list of option objects (subcommands).
        The command must have been synced (globally or to this guild), as on
        Discord, unless ``allow_unregistered``.
        """
        channel = self._channel(channel_id)
        user_obj = self._user(user)
        gid = str(guild_id) if guild_id is not None else channel.get("guild_id")
        self._ensure_can_post(channel, gid, user_obj["id"])
        command, scope = self._find_command(name, gid)
        if command is None and not allow_unregistered:
            raise LookupError(
                f"/{name} is not a synced command here; synced: {self._synced_names(gid)}"
            )
        data: JSON = {"id": command["id"] if command else self._ids.next(), "name": name, "type": 1}
        if scope is not None:
            data["guild_id"] = scope
        option_list, resolved = self._build_options(command, options, gid)
        if option_list:
            data["options"] = option_list
        if resolved:
            data["resolved"] = resolved
        record = InteractionRecord(
            id=self._ids.next(),
            token=f"aW50ZXJhY3Rpb24{secrets.token_urlsafe(48)}",
            command_name=name,
            user_id=user_obj["id"],
            channel_id=str(channel["id"]),
            guild_id=gid,
            ack_window=self.interaction_ack_timeout,
        )
        self._interactions[record.id] = record
        self._interactions_by_token[record.token] = record
        payload = self._interaction_payload(record, data, channel, locale)
        record.dispatched_at = time.monotonic()
        await self._dispatch("INTERACTION_CREATE", payload)
        return record

    # ------------------------------------------------------------------ gateway control

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT to every connected client (they should RESUME)."""
        for connection in list(self._connections):
            await self._send(connection, {"op": 7, "d": None})

    async def invalidate_sessions(self, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION to every connected client."""
        for connection in list(self._connections):
            if connection.session is not None and not resumable:
                connection.session.invalidated = True
            await self._send(connection, {"op": 9, "d": resumable})

    async def drop_connections(self, code: int = 4000) -> None:
        """Close every gateway socket with ``code``; sessions stay resumable."""
        for connection in list(self._connections):
            await self._close_connection(connection, code, "dropped by test")

    @property
    def connected_sessions(self) -> int:
        return sum(
            1 for s in self._sessions.values() if s.connection is not None and not s.invalidated
        )

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._requests)

    def requests_to(self, method: str, path_regex: str) -> list[RecordedRequest]:
        """Recorded calls whose method matches and whose path fully matches ``path_regex``."""
        pattern = re.compile(path_regex)
        return [
            r for r in self._requests if r.method == method.upper() and pattern.fullmatch(r.path)
        ]

    def channel_messages(self, channel_id: Snowflake) -> list[FakeMessage]:
        """Messages currently visible in the channel (not deleted, not ephemeral), oldest first."""
        ids = self._channel_log.get(str(channel_id), [])
        found = (self._messages[i] for i in ids)
        return [m for m in found if not m.deleted and not m.ephemeral]

    def bot_messages(self, channel_id: Snowflake | None = None) -> list[FakeMessage]:
        """Visible messages authored by the bot, in one channel or everywhere."""
        if channel_id is not None:
            pool = self.channel_messages(channel_id)
        else:
            pool = [m for m in self._messages.values() if not m.deleted and not m.ephemeral]
        return [m for m in pool if m.author_id == self.bot_user["id"]]

    def message(self, message_id: Snowflake) -> FakeMessage:
        try:
            return self._messages[str(message_id)]
        except KeyError:
            raise KeyError(f"no message {message_id}") from None

    def interaction_responses(self, interaction_id: Snowflake) -> InteractionRecord:
        """The record of how the bot answered an interaction (ack type/time, original, follow-ups)."""
        return self._interactions[str(interaction_id)]

    def commands(self, guild_id: Snowflake | None = None) -> list[JSON]:
        """Synced application commands: global when ``guild_id`` is None."""
        return copy.deepcopy(self._commands.get(None if guild_id is None else str(guild_id), []))

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until ``predicate()`` (sync or async) is truthy; return its value.

        Raises AssertionError describing the predicate and recent traffic on timeout.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(self._timeout_report(predicate, timeout))
            await self._wait_changed(min(remaining, 0.05))

    # ------------------------------------------------------------------ rate limits

    def inject_429(
        self,
        method: str,
        path_regex: str,
        retry_after: float = 0.5,
        times: int = 1,
        global_: bool = False,
        via: bool = True,
    ) -> InjectedRateLimit:
        """Answer the next ``times`` matching calls with 429 (path is fully matched, relative to api_base).

        ``via=False`` leaves out the ``Via`` header, as a 429 from a proxy or Cloudflare
        does; discord.py then raises instead of retrying."""
        injected = InjectedRateLimit(
            method.upper(), re.compile(path_regex), retry_after, times, global_, via=via
        )
        self._injected.append(injected)
        return injected

    def limit_route(self, method: str, path_regex: str, limit: int, per: float) -> None:
        """Emulate a real bucket: ``limit`` calls per ``per`` seconds for each concrete path.

        Responses then carry true X-RateLimit-* headers, so discord.py
        throttles itself; a client that ignores them gets 429s.
        """
        bucket = hashlib.sha1(f"{method} {path_regex}".encode()).hexdigest()[:16]
        self._route_limits.append(
            _RouteLimit(method.upper(), re.compile(path_regex), limit, per, bucket)
        )

    # ================================================================== internals: world

    def _new_user(
        self, username: str, *, bot: bool = False, global_name: str | None = None
    ) -> JSON:
        user: JSON = {
            "id": self._ids.next(),
            "username": username,
            "discriminator": "0",
            "global_name": global_name,
            "avatar": None,
            "banner": None,
            "accent_color": None,
            "avatar_decoration_data": None,
            "bot": bot,
            "system": False,
            "public_flags": 0,
            "flags": 0,
        }
        self._users[user["id"]] = user
        return user

    def _user(self, ref: UserRef | None) -> JSON:
        """Resolve a user object, id, or username (unknown usernames are created)."""
        if ref is None:
            raise ValueError("a user is required")
        if isinstance(ref, Mapping):
            known = self._users.get(str(ref["id"]))
            if known is None:
                known = {**ref, "id": str(ref["id"])}
                known.setdefault("discriminator", "0")
                known.setdefault("avatar", None)
                self._users[known["id"]] = known
            return known
        text = str(ref)
        if text.isdigit():
            if text not in self._users:
                raise ValueError(f"unknown user id {text}")
            return self._users[text]
        for user in self._users.values():
            if user["username"] == text:
                return user
        return self._new_user(text)

    def _guild(self, guild_id: Snowflake) -> FakeGuild:
        try:
            return self._guilds[str(guild_id)]
        except KeyError:
            raise ValueError(f"unknown guild {guild_id}") from None

    def _channel(self, channel_id: Snowflake) -> JSON:
        try:
            return self._channels[str(channel_id)]
        except KeyError:
            raise ValueError(f"unknown channel {channel_id}") from None

    def _role_object(self, role_id: str, name: str, permissions: int, position: int) -> JSON:
        return {
            "id": role_id,
            "name": name,
            "color": 0,
            "colors": {"primary_color": 0},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": position,
            "permissions": str(permissions),
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }

    def _add_role(self, guild: FakeGuild, spec: RoleSpec) -> None:
        values = {"name": spec} if isinstance(spec, str) else dict(spec)
        role = self._role_object(
            self._ids.next(), values.pop("name"), Permissions.EVERYONE_DEFAULT, len(guild.roles)
        )
        role.update({k: (str(v) if k == "permissions" else v) for k, v in values.items()})
        guild.roles[role["id"]] = role

    def _role_ref(self, guild: FakeGuild, ref: Snowflake) -> str:
        if str(ref) in guild.roles:
            return str(ref)
        return guild.role_id(str(ref))

    def _add_channel(self, guild: FakeGuild, spec: ChannelSpec) -> None:
        values = {"name": spec} if isinstance(spec, str) else dict(spec)
        kind = values.get("type", CH_TEXT)
        channel: JSON = {
            "id": self._ids.next(),
            "type": kind,
            "guild_id": guild.id,
            "name": values["name"],
            "position": len(guild.channels),
            "permission_overwrites": [],
            "parent_id": None,
            "flags": 0,
            "nsfw": False,
        }
        if kind in (CH_TEXT, CH_NEWS, CH_FORUM):
            channel.update(
                topic=None,
                last_message_id=None,
                rate_limit_per_user=0,
                default_auto_archive_duration=1440,
                default_thread_rate_limit_per_user=0,
            )
        if kind == CH_VOICE:
            channel.update(bitrate=64000, user_limit=0, rtc_region=None, last_message_id=None)
        if kind == CH_FORUM:
            channel.update(
                available_tags=[],
                default_reaction_emoji=None,
                default_sort_order=None,
                default_forum_layout=0,
            )
        channel.update(values)
        guild.channels[channel["id"]] = channel
        self._channels[channel["id"]] = channel

    def _put_member(self, guild: FakeGuild, user_id: str, role_ids: Sequence[str]) -> None:
        guild.members[user_id] = {"roles": list(role_ids), "joined_at": _iso_now(), "nick": None}

    def _dm_channel(self, user_id: str) -> JSON:
        if user_id not in self._dm_by_user:
            channel = {
                "id": self._ids.next(),
                "type": CH_DM,
                "last_message_id": None,
                "flags": 0,
                "recipients": [self._users[user_id]],
            }
            self._channels[channel["id"]] = channel
            self._dm_by_user[user_id] = channel["id"]
        return self._channels[self._dm_by_user[user_id]]

    def _create_thread(
        self, parent: JSON, thread_id: str, name: str, kind: int, owner_id: str
    ) -> JSON:
        if parent.get("type") not in THREAD_PARENTS or "guild_id" not in parent:
            raise _ApiError.of(400, 50024, "Cannot execute action on this channel type")
        guild = self._guilds[parent["guild_id"]]
        now = _iso_now()
        thread: JSON = {
            "id": thread_id,
            "guild_id": guild.id,
            "parent_id": str(parent["id"]),
            "owner_id": owner_id,
            "type": kind,
            "name": name,
            "last_message_id": None,
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "flags": 0,
            "total_message_sent": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": now,
                "locked": False,
                "create_timestamp": now,
                "invitable": True,
            },
            "member": {
                "id": thread_id,
                "user_id": self.bot_user["id"],
                "join_timestamp": now,
                "flags": 0,
            },
        }
        guild.threads[thread_id] = thread
        self._channels[thread_id] = thread
        return thread

    def _ensure_can_post(self, channel: JSON, guild_id: str | None, user_id: str) -> None:
        if channel["type"] not in MESSAGEABLE_CHANNELS:
            raise ValueError(
                f"channel {channel['id']} (type {channel['type']}) is not a text channel"
            )
        if guild_id is not None:
            guild = self._guild(guild_id)
            if user_id not in guild.members:
                self._put_member(guild, user_id, [])  # convenience: posting implies membership
            return
        recipients = {str(u["id"]) for u in channel.get("recipients", [])}
        if user_id not in recipients:
            raise ValueError(f"user {user_id} is not a recipient of DM channel {channel['id']}")

    def _member_permissions(self, guild: FakeGuild, user_id: str) -> int:
        if user_id == guild.owner_id:
            return Permissions.ALL
        member = guild.members.get(user_id, {"roles": []})
        perms = int(guild.roles[guild.id]["permissions"])
        for role_id in member["roles"]:
            perms |= int(guild.roles[role_id]["permissions"])
        return Permissions.ALL if perms & Permissions.ADMINISTRATOR else perms

    # ================================================================== internals: payloads

    def _member_payload(self, guild: FakeGuild, user_id: str, *, with_user: bool = True) -> JSON:
        member = guild.members[user_id]
        payload: JSON = {
            "nick": member["nick"],
            "avatar": None,
            "banner": None,
            "roles": list(member["roles"]),
            "joined_at": member["joined_at"],
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if with_user:
            payload["user"] = dict(self._users[user_id])
        return payload

    def _guild_payload(self, guild: FakeGuild) -> JSON:
        text_ids = [c["id"] for c in guild.channels.values() if c["type"] == CH_TEXT]
        return {
            "id": guild.id,
            "name": guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": guild.owner_id,
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "roles": list(guild.roles.values()),
            "emojis": [],
            "stickers": [],
            "features": [],
            "mfa_level": 0,
            "application_id": None,
            "system_channel_id": text_ids[0] if text_ids else None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "max_members": 500000,
            "vanity_url_code": None,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "premium_progress_bar_enabled": False,
            "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50,
        }

    def _guild_create_payload(self, guild: FakeGuild, *, newly_joined: bool = False) -> JSON:
        payload: JSON = {
            **self._guild_payload(guild),
            "joined_at": guild.joined_at,
            "large": False,
            "unavailable": False,
            "member_count": len(guild.members),
            "members": [self._member_payload(guild, uid) for uid in guild.members],
            "channels": [dict(c) for c in guild.channels.values()],
            "threads": [dict(t) for t in guild.threads.values()],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "embedded_activities": [],
        }
        if newly_joined:
            # Lazy-loaded guilds (after READY) say unavailable=false; a join omits the key,
            # which is how discord.py tells on_guild_join from on_guild_available.
            del payload["unavailable"]
        return payload

    def _application_payload(self) -> JSON:
        flags = 0
        for intent, flag in _APP_FLAG_FOR_INTENT.items():
            if self.privileged_intents & intent:
                flags |= flag
        return {
            "id": self.application_id,
            "name": self.bot_user["username"],
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": hashlib.sha256(self.application_id.encode()).hexdigest(),
            "flags": flags,
            "owner": dict(self.owner_user),
            "team": None,
            "bot": dict(self.bot_user),
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
            "approximate_guild_count": len(self._guilds),
            "rpc_origins": [],
        }

    def _ready_payload(self, session: _GatewaySession) -> JSON:
        return {
            "v": API_VERSION,
            "user": {**self.bot_user, "verified": True, "mfa_enabled": False, "email": None},
            "guilds": [{"id": g.id, "unavailable": True} for g in self._guilds.values()],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "shard": session.shard,
            "application": {
                "id": self.application_id,
                "flags": self._application_payload()["flags"],
            },
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "user_settings": {},
            "geo_ordered_rtc_regions": [],
            "_trace": ["fake-discord-gateway"],
        }

    def _partial_member_for_message(self, msg: FakeMessage) -> JSON | None:
        if msg.guild_id is None or msg.webhook_id is not None:
            return None
        guild = self._guilds.get(msg.guild_id)
        if guild is None or msg.author_id not in guild.members:
            return None
        return self._member_payload(guild, msg.author_id, with_user=False)

    def _mention_payload(self, user_id: str, guild_id: str | None) -> JSON:
        user = dict(
            self._users.get(
                user_id,
                {"id": user_id, "username": "unknown", "discriminator": "0", "avatar": None},
            )
        )
        guild = self._guilds.get(guild_id) if guild_id else None
        if guild is not None and user_id in guild.members:
            user["member"] = self._member_payload(guild, user_id, with_user=False)
        return user

    def _reactions_payload(self, msg: FakeMessage) -> list[JSON]:
        counts: dict[str, list[str]] = {}
        for key, user_id in msg.reactions:
            counts.setdefault(key, []).append(user_id)
        result = []
        for key, users in counts.items():
            name, _, emoji_id = key.partition(":")
            result.append(
                {
                    "count": len(users),
                    "count_details": {"burst": 0, "normal": len(users)},
                    "me": self.bot_user["id"] in users,
                    "me_burst": False,
                    "burst_colors": [],
                    "emoji": {"id": emoji_id or None, "name": name},
                }
            )
        return result

    def _message_payload(self, msg: FakeMessage, *, with_reference: bool = True) -> JSON:
        data: JSON = {
            "id": msg.id,
            "channel_id": msg.channel_id,
            "author": dict(msg.author),
            "content": msg.content,
            "timestamp": msg.timestamp,
            "edited_timestamp": msg.edited_timestamp,
            "tts": msg.tts,
            "mention_everyone": False,
            "mentions": [self._mention_payload(uid, msg.guild_id) for uid in msg.mentions],
            "mention_roles": list(msg.mention_roles),
            "attachments": copy.deepcopy(msg.attachments),
            "embeds": copy.deepcopy(msg.embeds),
            "components": copy.deepcopy(msg.components),
            "pinned": False,
            "type": msg.type,
            "flags": msg.flags,
        }
        if msg.guild_id is not None:
            data["guild_id"] = msg.guild_id
        member = self._partial_member_for_message(msg)
        if member is not None:
            data["member"] = member
        if msg.reactions:
            data["reactions"] = self._reactions_payload(msg)
        if msg.nonce is not None:
            data["nonce"] = msg.nonce
        if msg.webhook_id is not None:
            data.update(webhook_id=msg.webhook_id, application_id=self.application_id)
        if msg.interaction_metadata is not None:
            data["interaction_metadata"] = dict(msg.interaction_metadata)
        if msg.message_reference is not None:
            data["message_reference"] = dict(msg.message_reference)
            if with_reference:
                data["referenced_message"] = self._referenced_payload(msg.message_reference)
        return data

    def _referenced_payload(self, reference: JSON) -> JSON | None:
        target = self._messages.get(str(reference.get("message_id")))
        if target is None or target.deleted:
            return None
        return self._message_payload(target, with_reference=False)

    def _reaction_payload(
        self, channel: JSON, message_id: str, user_id: str, emoji: JSON, msg: FakeMessage | None
    ) -> JSON:
        payload: JSON = {
            "user_id": user_id,
            "channel_id": str(channel["id"]),
            "message_id": message_id,
            "emoji": emoji,
            "burst": False,
            "burst_colors": [],
            "type": 0,
        }
        if msg is not None:
            payload["message_author_id"] = msg.author_id
        guild_id = channel.get("guild_id")
        if guild_id is not None:
            payload["guild_id"] = guild_id
            guild = self._guilds[guild_id]
            if user_id in guild.members:
                payload["member"] = self._member_payload(guild, user_id)
        return payload

    def _interaction_payload(
        self, record: InteractionRecord, data: JSON, channel: JSON, locale: str
    ) -> JSON:
        payload: JSON = {
            "id": record.id,
            "application_id": self.application_id,
            "type": 2,
            "data": data,
            "token": record.token,
            "version": 1,
            "channel_id": record.channel_id,
            "locale": locale,
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
        }
        if record.guild_id is None:
            payload.update(
                channel=dict(channel),
                user=dict(self._users[record.user_id]),
                context=1,
                authorizing_integration_owners={"0": "0"},
                app_permissions=str(Permissions.BOT_DEFAULT),
            )
            return payload
        guild = self._guilds[record.guild_id]
        member = self._member_payload(guild, record.user_id)
        member["permissions"] = str(self._member_permissions(guild, record.user_id))
        bot_perms = str(self._member_permissions(guild, self.bot_user["id"]))
        payload.update(
            guild_id=guild.id,
            guild={"id": guild.id, "locale": "en-US", "features": []},
            guild_locale="en-US",
            member=member,
            channel={**channel, "permissions": member["permissions"]},
            context=0,
            authorizing_integration_owners={"0": guild.id},
            app_permissions=bot_perms,
        )
        return payload

    # ================================================================== internals: messages

    def _store_message(self, msg: FakeMessage) -> None:
        self._messages[msg.id] = msg
        self._channel_log.setdefault(msg.channel_id, []).append(msg.id)
        channel = self._channels.get(msg.channel_id)
        if channel is not None and not msg.ephemeral:
            channel["last_message_id"] = msg.id
            if channel["type"] in (CH_PUBLIC_THREAD, CH_PRIVATE_THREAD):
                channel["message_count"] += 1
                channel["total_message_sent"] += 1
        self._notify()

    def _mark_edited(self, msg: FakeMessage) -> None:
        msg.edit_count += 1
        msg.edited_timestamp = _iso_now()
        msg.content_history.append(msg.content)
        self._notify()

    def _set_mentions(self, msg: FakeMessage, *, replied_user: bool) -> None:
        mentioned = [
            uid for uid in re.findall(r"<@!?(\d{15,20})>", msg.content) if uid in self._users
        ]
        target = self._messages.get(str(msg.reply_to_id)) if msg.reply_to_id else None
        if replied_user and target is not None and target.author_id != msg.author_id:
            mentioned.append(target.author_id)
        msg.mentions = list(dict.fromkeys(mentioned))
        guild = self._guilds.get(msg.guild_id) if msg.guild_id else None
        role_ids = re.findall(r"<@&(\d{15,20})>", msg.content)
        msg.mention_roles = [
            r for r in dict.fromkeys(role_ids) if guild is not None and r in guild.roles
        ]

    def _user_reference(
        self, channel: JSON, guild_id: str | None, reply_to: Snowflake | FakeMessage | None
    ) -> JSON | None:
        if reply_to is None:
            return None
        target_id = reply_to.id if isinstance(reply_to, FakeMessage) else str(reply_to)
        target = self._messages.get(target_id)
        if target is None:
            raise ValueError(f"cannot reply to unknown message {target_id}")
        return self._reference_object(target, guild_id)

    def _reference_object(self, target: FakeMessage, guild_id: str | None) -> JSON:
        reference: JSON = {"type": 0, "message_id": target.id, "channel_id": target.channel_id}
        if guild_id is not None:
            reference["guild_id"] = guild_id
        return reference

    def _bot_reference(self, channel: JSON, raw: Mapping[str, Any] | None) -> JSON | None:
        """Validate a bot-sent message_reference the way Discord does."""
        if not raw:
            return None
        target = self._messages.get(str(raw.get("message_id")))
        target_channel = str(raw.get("channel_id", channel["id"]))
        if target is None or target.deleted or target.channel_id != target_channel:
            if raw.get("fail_if_not_exists", True) is False:
                return None
            raise _ApiError.invalid_form(
                {
                    "message_reference": _error_list(
                        "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
                    )
                }
            )
        return self._reference_object(target, channel.get("guild_id"))

    def _attachments_from(
        self, msg: FakeMessage, payload: Mapping[str, Any], files: Sequence[JSON]
    ) -> list[JSON]:
        """Keep referenced existing attachments, add uploaded files (matched by ``files[n]`` index)."""
        if "attachments" not in payload and not files:
            return msg.attachments
        existing = {str(a["id"]): a for a in msg.attachments}
        by_index = {str(i): f for i, f in enumerate(files)}
        result: list[JSON] = []
        wanted = payload.get("attachments")
        entries = wanted if wanted is not None else [{"id": str(i)} for i in range(len(files))]
        for entry in entries:
            key = str(entry.get("id"))
            if key in existing:
                result.append(existing[key])
            elif key in by_index:
                result.append(self._attachment_object(msg.channel_id, by_index[key], entry))
        return result

    def _attachment_object(self, channel_id: str, upload: JSON, entry: Mapping[str, Any]) -> JSON:
        attachment_id = self._ids.next()
        self._attachment_data[attachment_id] = upload.get("data", b"")
        url = f"{self.base_url}/attachments/{channel_id}/{attachment_id}/{upload['filename']}"
        return {
            "id": attachment_id,
            "filename": upload["filename"],
            "size": upload["size"],
            "url": url,
            "proxy_url": url,
            "content_type": upload.get("content_type"),
            "description": entry.get("description"),
            "ephemeral": False,
        }

    def _apply_message_fields(
        self, msg: FakeMessage, payload: Mapping[str, Any], files: Sequence[JSON]
    ) -> None:
        """Apply create/edit body fields; raises _ApiError for limit violations or empty results."""
        errors = message_payload_errors(payload)
        if errors:
            raise _ApiError.invalid_form(errors)
        if "content" in payload:
            msg.content = payload["content"] or ""
        if "embeds" in payload:
            msg.embeds = [dict(e, type=e.get("type", "rich")) for e in payload["embeds"] or []]
        if "components" in payload:
            msg.components = list(payload["components"] or [])
        if "flags" in payload and payload["flags"] is not None:
            msg.flags = (msg.flags & ~FLAG_SUPPRESS_EMBEDS) | (
                int(payload["flags"]) & FLAG_SUPPRESS_EMBEDS
            )
        if payload.get("sticker_ids"):
            msg.sticker_ids = [str(s) for s in payload["sticker_ids"]]
        msg.attachments = self._attachments_from(msg, payload, files)
        if not (
            msg.content
            or msg.embeds
            or msg.attachments
            or msg.components
            or msg.sticker_ids
            or payload.get("poll")
            or msg.loading
        ):
            raise _ApiError.of(400, 50006, "Cannot send an empty message")

    def _validated_update(
        self, msg: FakeMessage, payload: Mapping[str, Any], files: Sequence[JSON]
    ) -> None:
        """Apply an edit atomically: a rejected edit leaves the message untouched."""
        candidate = copy.deepcopy(msg)
        self._apply_message_fields(candidate, payload, files)
        for item in dataclasses.fields(FakeMessage):
            setattr(msg, item.name, getattr(candidate, item.name))
        self._set_mentions(msg, replied_user=False)

    def _bot_message(
        self, channel: JSON, payload: Mapping[str, Any], files: Sequence[JSON]
    ) -> FakeMessage:
        reference = self._bot_reference(channel, payload.get("message_reference"))
        msg = FakeMessage(
            id=self._ids.next(),
            channel_id=str(channel["id"]),
            guild_id=channel.get("guild_id"),
            author=dict(self.bot_user),
            type=MSG_REPLY if reference else MSG_DEFAULT,
            message_reference=reference,
            timestamp=_iso_now(),
            tts=bool(payload.get("tts")),
            nonce=payload.get("nonce"),
        )
        self._apply_message_fields(msg, payload, files)
        msg.content_history = [msg.content]
        replied = (payload.get("allowed_mentions") or {}).get("replied_user", True)
        self._set_mentions(msg, replied_user=bool(replied))
        return msg

    # ================================================================== internals: gateway dispatch

    def _spawn_dispatch(self, event: str, build: Callable[[], JSON]) -> None:
        """Dispatch from sync world-building methods, only if a session could receive it."""
        if not any(not s.invalidated for s in self._sessions.values()):
            return
        task = asyncio.get_running_loop().create_task(self._dispatch(event, build()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _event_intent(event: str, data: Mapping[str, Any]) -> int | None:
        in_guild = "guild_id" in data
        if event.startswith("MESSAGE_REACTION"):
            return Intents.GUILD_MESSAGE_REACTIONS if in_guild else Intents.DIRECT_MESSAGE_REACTIONS
        if event.startswith("MESSAGE_"):
            return Intents.GUILD_MESSAGES if in_guild else Intents.DIRECT_MESSAGES
        if event == "TYPING_START":
            return Intents.GUILD_MESSAGE_TYPING if in_guild else Intents.DIRECT_MESSAGE_TYPING
        if event in ("GUILD_MEMBER_ADD", "GUILD_MEMBER_UPDATE", "GUILD_MEMBER_REMOVE"):
            return Intents.GUILD_MEMBERS
        if event.startswith(("GUILD_", "CHANNEL_", "THREAD_")) and event != "GUILD_MEMBERS_CHUNK":
            return Intents.GUILDS
        return None

    def _visible_payload(self, session: _GatewaySession, event: str, data: JSON) -> JSON:
        """Strip content Discord withholds from bots lacking MESSAGE_CONTENT."""
        if (
            event not in ("MESSAGE_CREATE", "MESSAGE_UPDATE")
            or session.intents & Intents.MESSAGE_CONTENT
        ):
            return data
        bot_id = self.bot_user["id"]
        mentioned = any(str(m.get("id")) == bot_id for m in data.get("mentions", []))
        if "guild_id" not in data or data["author"]["id"] == bot_id or mentioned:
            return data
        stripped = dict(data, content="", embeds=[], attachments=[], components=[])
        stripped.pop("poll", None)
        return stripped

    async def _dispatch(self, event: str, data: JSON) -> None:
        intent = self._event_intent(event, data)
        for session in list(self._sessions.values()):
            if session.invalidated or (intent is not None and not session.intents & intent):
                continue
            await self._dispatch_to(session, event, self._visible_payload(session, event, data))

    async def _dispatch_to(self, session: _GatewaySession, event: str, data: JSON) -> None:
        session.seq += 1
        frame = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.buffer.append(frame)
        if session.connection is not None:
            await self._send(session.connection, frame)

    def _is_bot_echo_suppressed(self, msg: FakeMessage) -> bool:
        return msg.ephemeral or (not self.echo_bot_events and msg.author_id == self.bot_user["id"])

    async def _dispatch_message(self, event: str, msg: FakeMessage) -> None:
        if not self._is_bot_echo_suppressed(msg):
            await self._dispatch(event, self._message_payload(msg))

    async def _dispatch_delete(self, msg: FakeMessage) -> None:
        if self._is_bot_echo_suppressed(msg):
            return
        payload: JSON = {"id": msg.id, "channel_id": msg.channel_id}
        if msg.guild_id is not None:
            payload["guild_id"] = msg.guild_id
        await self._dispatch("MESSAGE_DELETE", payload)

    # ================================================================== internals: gateway socket

    async def _gateway_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(timeout=2.0, max_msg_size=0)
        await ws.prepare(request)
        self.gateway_urls.append(request.path_qs)
        # discord.py asks for zlib-stream unless zstandard is installed; text frames are accepted too.
        wants_zlib = request.query.get("compress") == "zlib-stream"
        connection = _GatewayConnection(
            ws=ws, compressor=zlib.compressobj() if wants_zlib else None
        )
        self._connections.add(connection)
        try:
            if request.query.get("v", str(API_VERSION)) not in ("9", "10"):
                await self._close_connection(
                    connection, CLOSE_INVALID_API_VERSION, "Invalid API version"
                )
                return ws
            await self._send(
                connection,
                {
                    "op": 10,
                    "d": {
                        "heartbeat_interval": self.heartbeat_interval_ms,
                        "_trace": ["fake-discord-gateway"],
                    },
                },
            )
            await self._gateway_loop(connection)
        finally:
            self._on_connection_closed(connection)
        return ws

    async def _gateway_loop(self, connection: _GatewayConnection) -> None:
        async for msg in connection.ws:
            if msg.type is WSMsgType.TEXT:
                await self._on_gateway_frame(connection, msg.data)
            elif msg.type is WSMsgType.BINARY:
                await self._close_connection(
                    connection, CLOSE_DECODE_ERROR, "Error while decoding payload."
                )
            if connection.ws.closed:
                break

    def _on_connection_closed(self, connection: _GatewayConnection) -> None:
        self._connections.discard(connection)
        session = connection.session
        if session is not None and session.connection is connection:
            session.connection = None
            # A client closing with 1000/1001 ends its session; other codes keep it resumable.
            if connection.ws.close_code in (1000, 1001) and not connection.server_closed:
                session.invalidated = True
        self._notify()

    async def _close_connection(
        self, connection: _GatewayConnection, code: int, reason: str
    ) -> None:
        connection.server_closed = True  # a close we initiate never ends the session
        if not connection.ws.closed:
            await connection.ws.close(code=code, message=reason.encode())

    async def _send(self, connection: _GatewayConnection, payload: JSON) -> None:
        await self._send_frames(connection, [payload])

    async def _send_frames(self, connection: _GatewayConnection, payloads: Sequence[JSON]) -> None:
        async with connection.lock:  # compression context and frame order must match send order
            for payload in payloads:
                if connection.ws.closed:
                    return
                try:
                    await self._send_frame(connection, json.dumps(payload))
                except ConnectionResetError:
                    return  # peer vanished mid-send; the receive loop will notice

    @staticmethod
    async def _send_frame(connection: _GatewayConnection, text: str) -> None:
        if connection.compressor is None:
            await connection.ws.send_str(text)
            return
        data = connection.compressor.compress(text.encode()) + connection.compressor.flush(
            zlib.Z_SYNC_FLUSH
        )
        await connection.ws.send_bytes(data)

    async def _on_gateway_frame(self, connection: _GatewayConnection, raw: str) -> None:
        try:
            frame = json.loads(raw)
        except json.JSONDecodeError:
            await self._close_connection(
                connection, CLOSE_DECODE_ERROR, "Error while decoding payload."
            )
            return
        op = frame.get("op")
        handlers: dict[int, Callable[[_GatewayConnection, Any], Awaitable[None]]] = {
            1: self._on_heartbeat,
            2: self._on_identify,
            3: self._on_presence,
            4: self._on_ignored,
            6: self._on_resume,
            8: self._on_request_members,
        }
        handler = handlers.get(op) if isinstance(op, int) else None
        if handler is None:
            await self._close_connection(connection, CLOSE_UNKNOWN_OPCODE, "Unknown opcode.")
        elif op not in (1, 2, 6) and connection.session is None:
            await self._close_connection(connection, CLOSE_NOT_AUTHENTICATED, "Not authenticated.")
        else:
            await handler(connection, frame.get("d"))

    async def _on_heartbeat(self, connection: _GatewayConnection, data: Any) -> None:
        await self._send(connection, {"op": 11})

    async def _on_ignored(self, connection: _GatewayConnection, data: Any) -> None:
        return None

    async def _on_presence(self, connection: _GatewayConnection, data: Any) -> None:
        self.presence_updates.append(data)
        self._notify()

    async def _on_identify(self, connection: _GatewayConnection, data: Any) -> None:
        if connection.session is not None:
            await self._close_connection(
                connection, CLOSE_ALREADY_AUTHENTICATED, "Already authenticated."
            )
            return
        if not isinstance(data, dict) or data.get("token") != self.token:
            await self._close_connection(connection, CLOSE_AUTH_FAILED, "Authentication failed.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int):
            await self._close_connection(connection, CLOSE_INVALID_INTENTS, "Invalid intent(s).")
            return
        if intents & Intents.PRIVILEGED & ~self.privileged_intents:
            await self._close_connection(
                connection, CLOSE_DISALLOWED_INTENTS, "Disallowed intent(s)."
            )
            return
        session = _GatewaySession(secrets.token_hex(16), intents, list(data.get("shard") or [0, 1]))
        self._sessions[session.session_id] = session
        session.connection, connection.session = connection, session
        self.identify_count += 1
        await self._dispatch_to(session, "READY", self._ready_payload(session))
        if intents & Intents.GUILDS:
            for guild in list(self._guilds.values()):
                await self._dispatch_to(session, "GUILD_CREATE", self._guild_create_payload(guild))
        self._notify()

    async def _on_resume(self, connection: _GatewayConnection, data: Any) -> None:
        data = data if isinstance(data, dict) else {}
        if data.get("token") != self.token:
            await self._close_connection(connection, CLOSE_AUTH_FAILED, "Authentication failed.")
            return
        session = self._sessions.get(str(data.get("session_id")))
        replay = self._replayable(session, data.get("seq"))
        if session is None or replay is None:
            await self._send(connection, {"op": 9, "d": False})
            return
        if session.connection is not None:
            await self._close_connection(session.connection, 4000, "session resumed elsewhere")
        session.connection, connection.session = connection, session
        self.resume_count += 1
        session.seq += 1
        resumed = {
            "op": 0,
            "t": "RESUMED",
            "s": session.seq,
            "d": {"_trace": ["fake-discord-gateway"]},
        }
        session.buffer.append(resumed)
        # One locked batch: events dispatched meanwhile get later seqs and queue behind it.
        await self._send_frames(connection, [*replay, resumed])
        self._notify()

    @staticmethod
    def _replayable(session: _GatewaySession | None, seq: Any) -> list[JSON] | None:
        """Frames after ``seq``, or None when the session cannot be resumed from there."""
        if session is None or session.invalidated or not isinstance(seq, int) or seq > session.seq:
            return None
        missed = [f for f in session.buffer if f["s"] > seq]
        if seq < session.seq and (not missed or missed[0]["s"] != seq + 1):
            return None
        return missed

    async def _on_request_members(self, connection: _GatewayConnection, data: Any) -> None:
        data = data if isinstance(data, dict) else {}
        guild = self._guilds.get(str(data.get("guild_id")))
        if guild is None or connection.session is None:
            return
        wanted = {str(u) for u in data.get("user_ids") or []}
        query = str(data.get("query") or "").lower()
        members = [
            self._member_payload(guild, uid)
            for uid in guild.members
            if (not wanted or uid in wanted)
            and self._users[uid]["username"].lower().startswith(query)
        ]
        chunk: JSON = {
            "guild_id": guild.id,
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": sorted(wanted - set(guild.members)),
        }
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        await self._dispatch_to(connection.session, "GUILD_MEMBERS_CHUNK", chunk)

    # ================================================================== internals: HTTP plumbing

    def _routes(self) -> list[tuple[str, str, Handler]]:
        channel_message = "/channels/{channel_id}/messages/{message_id}"
        own_reaction = channel_message + "/reactions/{emoji}/@me"
        webhook_message = "/webhooks/{app_id}/{token}/messages/{message_id}"
        return [
            ("GET", "/users/{user_id}", self._get_user),
            ("POST", "/users/{user_id}/channels", self._create_dm),
            ("GET", "/oauth2/applications/@me", self._get_application),
            ("GET", "/applications/@me", self._get_application),
            ("GET", "/gateway", self._get_gateway),
            ("GET", "/gateway/bot", self._get_gateway_bot),
            ("GET", "/applications/{app_id}/commands", self._get_commands),
            ("PUT", "/applications/{app_id}/commands", self._put_commands),
            ("POST", "/applications/{app_id}/commands", self._post_command),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands", self._get_commands),
            ("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", self._put_commands),
            ("POST", "/applications/{app_id}/guilds/{guild_id}/commands", self._post_command),
            ("GET", "/guilds/{guild_id}", self._get_guild),
            ("GET", "/guilds/{guild_id}/channels", self._get_guild_channels),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member),
            ("GET", "/channels/{channel_id}", self._get_channel),
            ("GET", "/channels/{channel_id}/messages", self._get_messages),
            ("POST", "/channels/{channel_id}/messages", self._create_message),
            ("GET", channel_message, self._get_message),
            ("PATCH", channel_message, self._edit_message),
            ("DELETE", channel_message, self._delete_message),
            ("POST", "/channels/{channel_id}/typing", self._typing),
            ("PUT", own_reaction, self._add_own_reaction),
            ("DELETE", own_reaction, self._remove_own_reaction),
            ("POST", "/channels/{channel_id}/threads", self._start_thread),
            ("POST", channel_message + "/threads", self._start_thread_from_message),
            ("PUT", "/channels/{channel_id}/thread-members/@me", self._join_thread),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._interaction_callback),
            ("POST", "/webhooks/{app_id}/{token}", self._execute_webhook),
            ("GET", webhook_message, self._get_webhook_message),
            ("PATCH", webhook_message, self._edit_webhook_message),
            ("DELETE", webhook_message, self._delete_webhook_message),
        ]

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX + "/"):
            return await handler(request)  # the gateway websocket and non-API paths
        record = RecordedRequest(
            request.method,
            request.path[len(API_PREFIX) :],
            dict(request.query),
            None,
            time.monotonic(),
        )
        self._requests.append(record)
        extra_headers: dict[str, str] = {}
        try:
            response = await self._handle_api(request, handler, record, extra_headers)
        except _ApiError as exc:
            response = exc.to_response()
        response.headers.update(extra_headers)
        record.status = response.status
        self._notify()
        return response

    async def _handle_api(
        self,
        request: web.Request,
        handler: Handler,
        record: RecordedRequest,
        extra_headers: dict[str, str],
    ) -> web.StreamResponse:
        record.json, files = await self._read_body(request)
        record.files = [f["filename"] for f in files]
        self._check_auth(request, record.path)
        self._check_injected_429(record)
        extra_headers.update(self._check_route_limit(record))
        try:
            return await handler(request)
        except web.HTTPException as exc:  # router misses (404/405) become Discord-shaped errors
            raise _ApiError.of(exc.status, 0, f"{exc.status}: {exc.reason}") from None

    async def _read_body(self, request: web.Request) -> tuple[Any, list[JSON]]:
        if not request.body_exists:
            request[_BODY_KEY] = (None, [])
        elif request.content_type == "multipart/form-data":
            request[_BODY_KEY] = await self._read_multipart(request)
        else:
            raw = await request.read()
            try:
                request[_BODY_KEY] = (json.loads(raw) if raw else None, [])
            except (json.JSONDecodeError, UnicodeDecodeError):
                request[_BODY_KEY] = (None, [])
                raise _ApiError.of(400, 50109, "The request body contains invalid JSON.") from None
        return request[_BODY_KEY]

    @staticmethod
    async def _read_multipart(request: web.Request) -> tuple[Any, list[JSON]]:
        payload: Any = None
        files: list[JSON] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "payload_json":
                payload = json.loads(await part.text())
            elif part.filename:
                data = bytes(await part.read())
                files.append(
                    {
                        "field": part.name,
                        "filename": part.filename,
                        "size": len(data),
                        "content_type": part.headers.get("Content-Type"),
                        "data": data,
                    }
                )
        return payload, files

    @staticmethod
    def _body(request: web.Request) -> tuple[JSON, list[JSON]]:
        payload, files = request[_BODY_KEY]
        if payload is None:
            return {}, files
        if not isinstance(payload, dict):
            raise _ApiError.invalid_form(
                _error_list("DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
            )
        return payload, files

    def _check_auth(self, request: web.Request, path: str) -> None:
        header = request.headers.get("Authorization")
        # Webhook-token routes (interaction callbacks/follow-ups) are authenticated by the token in the URL.
        token_route = path.startswith("/interactions/") or re.match(r"^/webhooks/[^/]+/[^/]+", path)
        if header is None and token_route:
            return
        if header != f"Bot {self.token}":
            raise _ApiError.of(401, 0, "401: Unauthorized")

    def _check_injected_429(self, record: RecordedRequest) -> None:
        for injected in self._injected:
            if injected.remaining <= 0 or injected.method != record.method:
                continue
            if injected.pattern.fullmatch(record.path):
                injected.remaining -= 1
                injected.hits += 1
                error = self._rate_limited(
                    injected.retry_after,
                    global_=injected.global_,
                    bucket=hashlib.sha1(injected.pattern.pattern.encode()).hexdigest()[:16],
                    limit=1,
                )
                if not injected.via:
                    error.headers.pop("Via", None)
                raise error

    def _check_route_limit(self, record: RecordedRequest) -> dict[str, str]:
        for route in self._route_limits:
            if route.method == record.method and route.pattern.fullmatch(record.path):
                return self._consume_bucket(route, record.path)
        return {}

    def _consume_bucket(self, route: _RouteLimit, path: str) -> dict[str, str]:
        now = time.monotonic()
        window = route.windows.setdefault(path, [now, 0.0])
        if now - window[0] >= route.per:
            window[0], window[1] = now, 0.0
        # Rounded *up* to the millisecond so a client honouring the header never arrives early.
        reset_after = math.ceil(max(0.0, window[0] + route.per - now) * 1000) / 1000
        if window[1] >= route.limit:
            raise self._rate_limited(
                reset_after, global_=False, bucket=route.bucket, limit=route.limit
            )
        window[1] += 1
        return {
            "X-RateLimit-Limit": str(route.limit),
            "X-RateLimit-Remaining": str(int(route.limit - window[1])),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": route.bucket,
        }

    @staticmethod
    def _rate_limited(retry_after: float, *, global_: bool, bucket: str, limit: int) -> _ApiError:
        body: JSON = {
            "message": "You are being rate limited.",
            "retry_after": round(retry_after, 3),
            "global": global_,
        }
        headers = {
            "Retry-After": str(max(1, math.ceil(retry_after))),
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": bucket,
            "X-RateLimit-Scope": "global" if global_ else "user",
            # discord.py treats a 429 without Via as a Cloudflare ban and raises instead of retrying.
            "Via": "1.1 google",
        }
        if global_:
            headers["X-RateLimit-Global"] = "true"
        return _ApiError(429, body, headers)

    def _api_channel(self, request: web.Request) -> JSON:
        channel = self._channels.get(request.match_info["channel_id"])
        if channel is None:
            raise _ApiError.unknown("channel")
        return channel

    def _api_message(self, request: web.Request, channel: JSON) -> FakeMessage:
        msg = self._messages.get(request.match_info["message_id"])
        if msg is None or msg.deleted or msg.channel_id != str(channel["id"]) or msg.ephemeral:
            raise _ApiError.unknown("message")
        return msg

    def _api_guild(self, request: web.Request) -> FakeGuild:
        guild = self._guilds.get(request.match_info["guild_id"])
        if guild is None:
            raise _ApiError.unknown("guild")
        return guild

    def _check_app(self, request: web.Request) -> None:
        if request.match_info["app_id"] != self.application_id:
            raise _ApiError.of(
                403, 20012, "You are not authorized to perform this action on this application"
            )

    # ================================================================== REST: users, app, gateway

    async def _get_user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        if user_id == "@me":
            return _json_response(
                {
                    **self.bot_user,
                    "verified": True,
                    "mfa_enabled": False,
                    "email": None,
                    "locale": "en-US",
                }
            )
        if user_id not in self._users:
            raise _ApiError.unknown("user")
        return _json_response(self._users[user_id])

    async def _create_dm(self, request: web.Request) -> web.Response:
        if request.match_info["user_id"] != "@me":
            raise _ApiError.of(404, 0, "404: Not Found")
        payload, _ = self._body(request)
        recipient = str(payload.get("recipient_id"))
        if recipient not in self._users or recipient == self.bot_user["id"]:
            raise _ApiError.of(400, 50033, "Invalid Recipient(s)")
        return _json_response(self._dm_channel(recipient))

    async def _get_application(self, request: web.Request) -> web.Response:
        return _json_response(self._application_payload())

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json_response({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        limit = {
            "total": 1000,
            "remaining": 1000 - self.identify_count,
            "reset_after": 86_400_000,
            "max_concurrency": 1,
        }
        return _json_response({"url": self.gateway_url, "shards": 1, "session_start_limit": limit})

    # ================================================================== REST: application commands

    def _command_scope(self, request: web.Request) -> str | None:
        self._check_app(request)
        if "guild_id" not in request.match_info:
            return None
        guild = self._guilds.get(request.match_info["guild_id"])
        if guild is None:
            raise _ApiError.of(403, 50001, "Missing Access")
        return guild.id

    def _stored_command(self, scope: str | None, definition: Mapping[str, Any]) -> JSON:
        kind = int(definition.get("type", 1))
        key = (scope, str(definition["name"]), kind)
        command_id = self._command_ids.setdefault(
            key, self._ids.next()
        )  # ids are stable across re-syncs
        command: JSON = {
            "default_member_permissions": None,
            "nsfw": False,
            "contexts": None,
            "integration_types": [0],
            "name_localizations": None,
            "description_localizations": None,
            "options": [],
            **copy.deepcopy(dict(definition)),
            "id": command_id,
            "application_id": self.application_id,
            "version": self._ids.next(),
            "type": kind,
        }
        command.setdefault("description", "")
        if scope is not None:
            command["guild_id"] = scope
        return command

    @staticmethod
    def _commands_errors(definitions: Sequence[Mapping[str, Any]]) -> JSON:
        errors = {
            str(i): e for i, e in ((i, command_errors(d)) for i, d in enumerate(definitions)) if e
        }
        if errors:
            return errors
        keys = [(d.get("name"), d.get("type", 1)) for d in definitions]
        if len(set(keys)) != len(keys):
            return _error_list(
                "APPLICATION_COMMANDS_DUPLICATE_NAME", "Application command names must be unique"
            )
        if sum(1 for d in definitions if d.get("type", 1) == 1) > COMMANDS_MAX:
            return _max_length_error(COMMANDS_MAX)
        return {}

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json_response(self._commands.get(self._command_scope(request), []))

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        payload, _ = request[_BODY_KEY]
        if not isinstance(payload, list):
            raise _ApiError.invalid_form(_error_list("BASE_TYPE_ARRAY", "Must be an array."))
        errors = self._commands_errors(payload)
        if errors:
            raise _ApiError.invalid_form(errors)
        self._commands[scope] = [self._stored_command(scope, d) for d in payload]
        return _json_response(self._commands[scope])

    async def _post_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        payload, _ = self._body(request)
        errors = command_errors(payload)
        if errors:
            raise _ApiError.invalid_form(errors)
        stored = self._stored_command(scope, payload)
        current = self._commands.setdefault(scope, [])
        existing = [i for i, c in enumerate(current) if c["id"] == stored["id"]]
        if existing:
            current[existing[0]] = stored
            return _json_response(stored)
        current.append(stored)
        return _json_response(stored, 201)

    def _find_command(self, name: str, guild_id: str | None) -> tuple[JSON | None, str | None]:
        scopes: list[str | None] = ([guild_id] if guild_id else []) + [None]
        for scope in scopes:
            for command in self._commands.get(scope, []):
                if (
                    command["name"] == name
                    and command["type"] == 1
                    and self._usable_here(command, guild_id)
                ):
                    return command, scope
        return None, None

    @staticmethod
    def _usable_here(command: Mapping[str, Any], guild_id: str | None) -> bool:
        contexts = command.get("contexts")
        if guild_id is not None:
            return contexts is None or 0 in contexts
        if command.get("dm_permission") is False:
            return False
        return contexts is None or 1 in contexts

    def _synced_names(self, guild_id: str | None) -> list[str]:
        scopes: list[str | None] = ([guild_id] if guild_id else []) + [None]
        return [c["name"] for s in scopes for c in self._commands.get(s, [])]

    def _build_options(
        self,
        command: JSON | None,
        options: Mapping[str, Any] | Sequence[JSON] | None,
        guild_id: str | None,
    ) -> tuple[list[JSON], JSON]:
        if not options:
            self._check_required_options(command, {})
            return [], {}
        if not isinstance(options, Mapping):
            return [dict(o) for o in options], {}
        specs = {o["name"]: o for o in (command or {}).get("options", [])}
        self._check_required_options(command, options)
        built: list[JSON] = []
        resolved: JSON = {}
        for name, value in options.items():
            if command is not None and name not in specs:
                raise ValueError(
                    f"/{command['name']} has no option {name!r}; it has {sorted(specs)}"
                )
            kind = specs[name]["type"] if name in specs else _infer_option_type(value)
            built.append(
                {
                    "name": name,
                    "type": kind,
                    "value": self._option_value(kind, value, guild_id, resolved),
                }
            )
        return built, resolved

    @staticmethod
    def _check_required_options(command: JSON | None, given: Mapping[str, Any]) -> None:
        if command is None:
            return
        missing = [
            o["name"]
            for o in command.get("options", [])
            if o.get("required") and o["name"] not in given
        ]
        if missing:
            raise ValueError(f"/{command['name']} requires options {missing}")

    def _option_value(self, kind: int, value: Any, guild_id: str | None, resolved: JSON) -> Any:
        if kind == OPT_USER:
            user = self._user(value)
            resolved.setdefault("users", {})[user["id"]] = dict(user)
            guild = self._guilds.get(guild_id) if guild_id else None
            if guild is not None and user["id"] in guild.members:
                member = self._member_payload(guild, user["id"], with_user=False)
                member["permissions"] = str(self._member_permissions(guild, user["id"]))
                resolved.setdefault("members", {})[user["id"]] = member
            return user["id"]
        if kind == OPT_CHANNEL:
            channel = self._channel(value)
            resolved.setdefault("channels", {})[str(channel["id"])] = {
                "id": str(channel["id"]),
                "name": channel.get("name"),
                "type": channel["type"],
                "permissions": str(Permissions.EVERYONE_DEFAULT),
                "parent_id": channel.get("parent_id"),
            }
            return str(channel["id"])
        if kind == OPT_ROLE:
            guild = self._guild(guild_id) if guild_id else None
            if guild is None:
                raise ValueError("role options need a guild")
            role_id = self._role_ref(guild, value)
            resolved.setdefault("roles", {})[role_id] = dict(guild.roles[role_id])
            return role_id
        if kind == OPT_STRING:
            return str(value)
        return value

    # ================================================================== REST: guilds & channels

    async def _get_guild(self, request: web.Request) -> web.Response:
        guild = self._api_guild(request)
        return _json_response(
            {**self._guild_payload(guild), "approximate_member_count": len(guild.members)}
        )

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        return _json_response(list(self._api_guild(request).channels.values()))

    async def _get_member(self, request: web.Request) -> web.Response:
        guild = self._api_guild(request)
        user_id = request.match_info["user_id"]
        if user_id not in guild.members:
            raise _ApiError.unknown("member")
        return _json_response(self._member_payload(guild, user_id))

    async def _get_channel(self, request: web.Request) -> web.Response:
        return _json_response(self._api_channel(request))

    async def _typing(self, request: web.Request) -> web.Response:
        self._api_channel(request)
        return _no_content()

    async def _join_thread(self, request: web.Request) -> web.Response:
        channel = self._api_channel(request)
        if channel["type"] not in (CH_PUBLIC_THREAD, CH_PRIVATE_THREAD):
            raise _ApiError.of(400, 50024, "Cannot execute action on this channel type")
        return _no_content()

    async def _start_thread(self, request: web.Request) -> web.Response:
        parent = self._api_channel(request)
        payload, _ = self._body(request)
        kind = int(payload.get("type") or CH_PUBLIC_THREAD)
        thread = self._create_thread(
            parent, self._ids.next(), self._thread_name(payload), kind, self.bot_user["id"]
        )
        await self._dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return _json_response(thread, 201)

    async def _start_thread_from_message(self, request: web.Request) -> web.Response:
        parent = self._api_channel(request)
        msg = self._api_message(request, parent)
        if msg.id in self._channels:
            raise _ApiError.of(400, 160004, "A thread has already been created for this message")
        payload, _ = self._body(request)
        # Discord gives a thread started from a message the message's id.
        thread = self._create_thread(
            parent, msg.id, self._thread_name(payload), CH_PUBLIC_THREAD, self.bot_user["id"]
        )
        await self._dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return _json_response(thread, 201)

    @staticmethod
    def _thread_name(payload: Mapping[str, Any]) -> str:
        name = payload.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 100:
            raise _ApiError.invalid_form(
                {
                    "name": _error_list(
                        "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                    )
                }
            )
        return name

    # ================================================================== REST: messages

    async def _create_message(self, request: web.Request) -> web.Response:
        channel = self._api_channel(request)
        if channel["type"] not in MESSAGEABLE_CHANNELS:
            raise _ApiError.of(400, 50008, "Cannot send messages in a non-text channel")
        payload, files = self._body(request)
        duplicate = self._nonce_duplicate(channel, payload)
        if duplicate is not None:
            return _json_response(self._message_payload(duplicate))
        msg = self._bot_message(channel, payload, files)
        if payload.get("enforce_nonce") and msg.nonce is not None:
            self._nonces[(msg.channel_id, str(msg.nonce))] = msg.id
        self._store_message(msg)
        await self._dispatch_message("MESSAGE_CREATE", msg)
        return _json_response(self._message_payload(msg))

    def _nonce_duplicate(self, channel: JSON, payload: Mapping[str, Any]) -> FakeMessage | None:
        if not payload.get("enforce_nonce") or payload.get("nonce") is None:
            return None
        existing = self._nonces.get((str(channel["id"]), str(payload["nonce"])))
        return self._messages.get(existing) if existing else None

    async def _get_message(self, request: web.Request) -> web.Response:
        channel = self._api_channel(request)
        return _json_response(self._message_payload(self._api_message(request, channel)))

    async def _get_messages(self, request: web.Request) -> web.Response:
        channel = self._api_channel(request)
        limit = int(request.query.get("limit", "50"))
        if not 1 <= limit <= 100:
            raise _ApiError.invalid_form(
                {"limit": _error_list("NUMBER_TYPE_MAX", "int value should be <= 100.")}
            )
        visible = [m for m in self.channel_messages(channel["id"])]
        return _json_response(
            [self._message_payload(m) for m in self._page(visible, request.query, limit)]
        )

    @staticmethod
    def _page(
        messages: list[FakeMessage], query: Mapping[str, str], limit: int
    ) -> list[FakeMessage]:
        """Discord's history paging; results are always newest first."""
        ordered = sorted(messages, key=lambda m: int(m.id))
        if "before" in query:
            chosen = [m for m in ordered if int(m.id) < int(query["before"])][-limit:]
        elif "after" in query:
            chosen = [m for m in ordered if int(m.id) > int(query["after"])][:limit]
        elif "around" in query:
            pivot = int(query["around"])
            older = [m for m in ordered if int(m.id) <= pivot][-(limit - limit // 2) :]
            newer = [m for m in ordered if int(m.id) > pivot][: limit // 2]
            chosen = older + newer
        else:
            chosen = ordered[-limit:]
        return list(reversed(chosen))

    async def _edit_message(self, request: web.Request) -> web.Response:
        channel = self._api_channel(request)
        msg = self._api_message(request, channel)
        if msg.author_id != self.bot_user["id"]:
            raise _ApiError.of(403, 50005, "Cannot edit a message authored by another user")
        payload, files = self._body(request)
        self._validated_update(msg, payload, files)
        self._mark_edited(msg)
        await self._dispatch_message("MESSAGE_UPDATE", msg)
        return _json_response(self._message_payload(msg))

    async def _delete_message(self, request: web.Request) -> web.Response:
        channel = self._api_channel(request)
        msg = self._api_message(request, channel)
        msg.deleted = True
        self._notify()
        await self._dispatch_delete(msg)
        return _no_content()

    async def _add_own_reaction(self, request: web.Request) -> web.Response:
        channel = self._api_channel(request)
        msg = self._api_message(request, channel)
        emoji = _parse_emoji(request.match_info["emoji"])
        key = (_emoji_key(emoji), self.bot_user["id"])
        if key not in msg.reactions:
            msg.reactions.append(key)
            self._notify()
            if self.echo_bot_events:
                payload = self._reaction_payload(channel, msg.id, self.bot_user["id"], emoji, msg)
                await self._dispatch("MESSAGE_REACTION_ADD", payload)
        return _no_content()

    async def _remove_own_reaction(self, request: web.Request) -> web.Response:
        channel = self._api_channel(request)
        msg = self._api_message(request, channel)
        emoji = _parse_emoji(request.match_info["emoji"])
        key = (_emoji_key(emoji), self.bot_user["id"])
        if key in msg.reactions:
            msg.reactions.remove(key)
            self._notify()
            if self.echo_bot_events:
                payload = self._reaction_payload(channel, msg.id, self.bot_user["id"], emoji, msg)
                payload.pop("member", None)
                await self._dispatch("MESSAGE_REACTION_REMOVE", payload)
        return _no_content()

    # ================================================================== REST: interactions & webhooks

    async def _interaction_callback(self, request: web.Request) -> web.Response:
        record = self._interactions.get(request.match_info["interaction_id"])
        if record is None or record.token != request.match_info["token"]:
            raise _ApiError.unknown("interaction")
        if record.callback_type is not None:
            raise _ApiError.of(400, 40060, "Interaction has already been acknowledged.")
        now = time.monotonic()
        if now - record.dispatched_at > self.interaction_ack_timeout:
            record.late_callbacks += (
                1  # Discord has already shown "The application did not respond"
            )
            raise _ApiError.unknown("interaction")
        payload, files = self._body(request)
        kind = payload.get("type")
        if kind not in (4, 5, 9):
            raise _ApiError.invalid_form(
                {
                    "type": _error_list(
                        "INTERACTION_RESPONSE_TYPE_INVALID", "Invalid interaction response type"
                    )
                }
            )
        data = payload.get("data") or {}
        if kind in (4, 5):
            record.original = self._interaction_message(
                record, data, files if kind == 4 else [], loading=kind == 5
            )
            record.ephemeral = record.original.ephemeral
        record.callback_type, record.callback_at, record.callback_data = kind, now, data
        if record.original is not None:
            self._store_message(record.original)
            await self._dispatch_message("MESSAGE_CREATE", record.original)
        self._notify()
        if not _truthy(request.query.get("with_response")):
            return _no_content()
        return _json_response(self._callback_response(record))

    def _callback_response(self, record: InteractionRecord) -> JSON:
        interaction: JSON = {"id": record.id, "type": 2}
        resource: JSON = {"type": record.callback_type}
        if record.original is not None:
            interaction.update(
                response_message_id=record.original.id,
                response_message_loading=record.original.loading,
                response_message_ephemeral=record.original.ephemeral,
            )
            resource["message"] = self._message_payload(record.original)
        return {"interaction": interaction, "resource": resource}

    def _interaction_message(
        self,
        record: InteractionRecord,
        data: Mapping[str, Any],
        files: Sequence[JSON],
        *,
        loading: bool,
    ) -> FakeMessage:
        flags = int(data.get("flags") or 0) & (FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS)
        msg = FakeMessage(
            id=self._ids.next(),
            channel_id=record.channel_id,
            guild_id=record.guild_id,
            author=dict(self.bot_user),
            flags=flags | (FLAG_LOADING if loading else 0),
            type=MSG_CHAT_INPUT_COMMAND,
            timestamp=_iso_now(),
            webhook_id=self.application_id,
            interaction_id=record.id,
            interaction_metadata=self._interaction_metadata(record),
        )
        if not loading:
            self._apply_message_fields(msg, data, files)
            self._set_mentions(msg, replied_user=False)
        msg.content_history = [msg.content]
        return msg

    def _interaction_metadata(self, record: InteractionRecord) -> JSON:
        owners = {"0": record.guild_id} if record.guild_id else {"0": "0"}
        return {
            "id": record.id,
            "type": 2,
            "user": dict(self._users[record.user_id]),
            "name": record.command_name,
            "command_type": 1,
            "authorizing_integration_owners": owners,
        }

    def _webhook_record(self, request: web.Request) -> InteractionRecord:
        record = self._interactions_by_token.get(request.match_info["token"])
        if record is None or request.match_info["app_id"] != self.application_id:
            raise _ApiError.unknown("webhook")
        if record.callback_type is None:
            raise _ApiError.unknown("webhook")  # follow-ups/edits need an acknowledged interaction
        return record

    def _webhook_message(self, request: web.Request, record: InteractionRecord) -> FakeMessage:
        message_id = request.match_info["message_id"]
        if message_id == "@original":
            found = record.original
        else:
            found = next((m for m in record.messages if m.id == message_id), None)
        if found is None or found.deleted:
            raise _ApiError.unknown("message")
        return found

    async def _execute_webhook(self, request: web.Request) -> web.Response:
        record = self._webhook_record(request)
        payload, files = self._body(request)
        original = record.original
        if original is not None and original.loading and not original.deleted:
            # The first follow-up after a deferred ack resolves the "thinking" message;
            # its flags are ignored because ephemerality was fixed by the ack.
            msg = await self._resolve_loading(
                original, {k: v for k, v in payload.items() if k != "flags"}, files
            )
        else:
            msg = self._interaction_message(record, payload, files, loading=False)
            msg.type = MSG_DEFAULT
            record.followups.append(msg)
            self._store_message(msg)
            await self._dispatch_message("MESSAGE_CREATE", msg)
        if not _truthy(request.query.get("wait")):
            return _no_content()
        return _json_response(self._message_payload(msg))

    async def _resolve_loading(
        self, msg: FakeMessage, payload: Mapping[str, Any], files: Sequence[JSON]
    ) -> FakeMessage:
        candidate = copy.deepcopy(msg)
        candidate.flags &= ~FLAG_LOADING
        self._apply_message_fields(candidate, payload, files)
        for item in dataclasses.fields(FakeMessage):
            setattr(msg, item.name, getattr(candidate, item.name))
        self._set_mentions(msg, replied_user=False)
        msg.content_history.append(msg.content)
        self._notify()
        await self._dispatch_message("MESSAGE_UPDATE", msg)
        return msg

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        record = self._webhook_record(request)
        return _json_response(self._message_payload(self._webhook_message(request, record)))

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        record = self._webhook_record(request)
        msg = self._webhook_message(request, record)
        payload, files = self._body(request)
        if msg.loading:
            # Editing the deferred "thinking" message is how it is completed; not shown as edited.
            await self._resolve_loading(msg, payload, files)
            return _json_response(self._message_payload(msg))
        self._validated_update(msg, payload, files)
        self._mark_edited(msg)
        await self._dispatch_message("MESSAGE_UPDATE", msg)
        return _json_response(self._message_payload(msg))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        record = self._webhook_record(request)
        msg = self._webhook_message(request, record)
        msg.deleted = True
        self._notify()
        await self._dispatch_delete(msg)
        return _no_content()

    async def _get_attachment(self, request: web.Request) -> web.Response:
        """The "CDN": serves uploaded bytes so ``Attachment.read()`` works."""
        data = self._attachment_data.get(request.match_info["attachment_id"])
        if data is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=data, content_type="application/octet-stream")

    # ================================================================== internals: waiting

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _wait_changed(self, timeout: float) -> None:
        if self._changed is None:
            await asyncio.sleep(timeout)
            return
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _timeout_report(self, predicate: Callable[[], Any], timeout: float) -> str:
        recent = "\n".join(
            f"  {r.method} {r.path} -> {r.status} json={str(r.json)[:200]}"
            for r in self._requests[-8:]
        )
        return (
            f"FakeDiscord.wait_for timed out after {timeout}s waiting for:\n  {_describe(predicate)}\n"
            f"connected gateway sessions: {self.connected_sessions}\n"
            f"last REST calls:\n{recent or '  (none)'}"
        )


@contextlib.contextmanager
def patched_discord_py(fake: FakeDiscord) -> Iterator[None]:
    """Point discord.py's REST base and default gateway at ``fake``; restore on exit."""
    import discord.gateway
    import discord.http
    import yarl

    old_base = discord.http.Route.BASE
    old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = fake.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE = old_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway
