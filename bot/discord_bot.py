"""The Discord adapter (discord.py 2.x): DMs, @mentions, replies to the bot, slash
commands and 👍/👎 reactions, turned into the chat service's `Incoming`.

- DMs: every message is a turn of that DM's conversation (text commands work too).
- Servers: a message that @mentions the bot (or its role), a reply to one of its
  messages, or `/ask`. A reply continues the chain of the message it answers, rebuilt
  from the store; anything else continues the channel's (or thread's) conversation.
  Other messages are neither answered nor stored.
- Answers stream into a reply to the user's message (discord_stream.py).
- Channels are answered in parallel; within a channel, in the order messages arrived.

Gateway intents: guilds, guild and DM messages, guild and DM reactions, and the
privileged MESSAGE_CONTENT (enable it in the Developer Portal, see docs/discord.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Iterator

import discord
import discord.gateway
import discord.http
import yarl

from bot.config import read_secret
from bot.discord_access import AccessPolicy, Place, RefusalLimiter, place_of
from bot.discord_commands import HELP, INTERRUPTED, add_commands
from bot.discord_config import DiscordConfig
from bot.discord_gateway import discord_endpoints, guard_parsers, intents
from bot.discord_incoming import (
    mentions,
    question_text,
    rating_of,
    replied_message,
    reply_target,
    with_quote,
)
from bot.discord_pacing import Throttles
from bot.discord_stream import ChannelTarget, DiscordSink, Target
from bot.service import FAILED, REFUSED, ChatService, Incoming, parse_command
from bot.store import StoredMessage
from engine.config import ConfigError

log = logging.getLogger(__name__)

PLATFORM = "discord"
EMPTY_QUESTION = "Yes? Write your question after the mention (or use /ask)."
ONLY_TEXT = "I can only read text: write your question as a message."
INVITE_PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    embed_links=True,  # [discord] output = "embed"
    read_message_history=True,  # needed to reply to a message
)
ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


class DiscordBot(discord.Client):
    def __init__(self, service: ChatService, cfg: DiscordConfig, *, grace_s: float = 5.0) -> None:
        super().__init__(
            intents=intents(),
            # Model output must never ping @everyone, roles or users; replies may.
            allowed_mentions=discord.AllowedMentions(
                everyone=False, users=False, roles=False, replied_user=True
            ),
        )
        self.service = service
        self.cfg = cfg
        self.access = AccessPolicy(cfg)
        self.refusals = RefusalLimiter()
        self.throttles = Throttles(cfg.edit_interval_s)
        self.tree = discord.app_commands.CommandTree(self)
        add_commands(self)
        guard_parsers(self._connection.parsers)
        self._order: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._work: set[asyncio.Task[object]] = set()
        self._grace_s = grace_s
        self._stopping = False

    async def setup_hook(self) -> None:
        """After login, before the gateway: find the gateway, register the commands."""
        if self.cfg.api_base and not self.cfg.gateway_url:
            await self._use_advertised_gateway()
        try:
            synced = await self.tree.sync()
        except discord.HTTPException as exc:
            log.warning("discord: could not register slash commands (%s); mentions work", exc)
            return
        log.info("discord: slash commands registered: %s", ", ".join(c.name for c in synced))

    async def _use_advertised_gateway(self) -> None:
        """A self-hosted server given by api_base alone says where its gateway is, as
        Discord does (GET /gateway/bot, else GET /gateway)."""
        for path in ("/gateway/bot", "/gateway"):
            try:
                data = await self.http.request(discord.http.Route("GET", path))
            except discord.HTTPException:
                continue
            if isinstance(data, dict) and data.get("url"):
                discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(data["url"])
                log.info("discord: %s names the gateway %s", self.cfg.api_base, data["url"])
                return
        raise ConfigError(
            f"[discord] api_base = {self.cfg.api_base!r} does not say where its gateway is "
            "(GET /gateway/bot): set gateway_url"
        )

    async def on_ready(self) -> None:
        assert self.user is not None
        url = discord.utils.oauth_url(
            self.application_id or self.user.id,
            permissions=INVITE_PERMISSIONS,
            scopes=("bot", "applications.commands"),
        )
        log.info(
            "discord: connected as %s in %d servers; invite: %s", self.user, len(self.guilds), url
        )

    async def close(self) -> None:
        """Stop taking messages, give running replies `grace_s` to finish (the rest are
        cut short with a note), then disconnect."""
        self._stopping = True
        current = asyncio.current_task()
        running = [t for t in self._work if t is not current and not t.done()]
        try:
            if running:
                _done, late = await asyncio.wait(running, timeout=self._grace_s)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        finally:
            # discord.py 2.7 leaves its wait-for-guilds task running when closed within
            # guild_ready_timeout of connecting; it would then fail on the closed client.
            ready = getattr(self._connection, "_ready_task", None)
            if ready is not None:
                ready.cancel()
            await super().close()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # shared by messages and commands ---------------------------------------------------
    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Mark the running task as work that close() must cancel."""
        task = asyncio.current_task()
        assert task is not None
        self._work.add(task)
        try:
            yield
        finally:
            self._work.discard(task)

    @contextlib.asynccontextmanager
    async def in_order(self, chat_id: str) -> AsyncIterator[None]:
        """One message of a channel at a time, in arrival order (asyncio locks are FIFO)."""
        lock = self._order.get(chat_id)
        if lock is None:
            lock = self._order[chat_id] = asyncio.Lock()
        async with lock:
            yield

    def sink(self, target: Target, channel_id: int, msg: Incoming) -> DiscordSink:
        async def remember(reply_id: int, message_ids: list[str]) -> None:
            await self.service.remember_platform_ids(msg, reply_id, message_ids)

        return DiscordSink(target, self.throttles.of(channel_id), self.cfg.output, remember)

    # messages ----------------------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        me = self.user
        if me is None or self._stopping:
            return
        if message.author.id == me.id or message.author.bot:
            return  # never answer ourselves or other bots (no loops)
        if message.webhook_id is not None or message.type not in ANSWERED_TYPES:
            return
        mentioned = mentions(message, me)
        reply_to = reply_target(message)
        if message.guild is not None and not mentioned and reply_to is None:
            return  # chatter: not for us, not stored
        with self.tracked():
            try:
                async with self.in_order(str(message.channel.id)):
                    await self._answer(message, mentioned, reply_to)
            except Exception:
                log.exception("discord: message %s in %s failed", message.id, message.channel.id)
                await self._say(message, FAILED)

    async def _answer(
        self, message: discord.Message, mentioned: bool, reply_to: str | None
    ) -> None:
        in_dm = message.guild is None
        if not in_dm and not mentioned and not await self._replies_to_me(message, reply_to):
            return
        place = place_of(message.channel, message.guild.id if message.guild else None)
        if not await self.access.allows(self, message.author, place):
            log.info("discord: refused user %s in %s", message.author.id, _where(place))
            if self.refusals.should_tell(message.author.id, message.channel.id):
                await self._say(message, REFUSED)
            return
        text = await self._question(message, reply_to)
        if not text:
            await self._say(message, ONLY_TEXT if in_dm else EMPTY_QUESTION)
            return
        msg = Incoming(
            platform=PLATFORM,
            chat_id=str(message.channel.id),
            user_id=str(message.author.id),
            text=text,
            user_name=message.author.display_name,
            is_group=not in_dm,
            message_id=str(message.id),
            reply_to=reply_to or "",
        )
        sink = self.sink(ChannelTarget(message.channel, message), message.channel.id, msg)
        try:
            command = parse_command(text) if in_dm else None
            if command is not None and command[0] in ("help", "start"):
                await sink.notice(HELP)
            elif in_dm:
                await self.service.handle(msg, sink)  # text commands: /reset, /retry
            else:
                await self.service.reply(msg, text, sink)
        except asyncio.CancelledError:
            await sink.interrupt(INTERRUPTED)
            raise
        finally:
            await sink.close()

    async def _replies_to_me(self, message: discord.Message, reply_to: str | None) -> bool:
        assert self.user is not None
        if reply_to is None:
            return False
        replied = replied_message(message)
        if replied is not None:
            return replied.author.id == self.user.id
        # Not sent along (deleted meanwhile): our own store knows our messages.
        ours = await self._stored(message.channel.id, reply_to)
        return ours is not None and ours.role == "assistant"

    async def _question(self, message: discord.Message, reply_to: str | None) -> str:
        """What to answer. A reply to a message we have not stored (someone else's, in a
        server) carries that message along as a quote: the model cannot see it."""
        assert self.user is not None
        text = question_text(message, self.user)
        replied = replied_message(message)
        if not text or reply_to is None or replied is None or not replied.content:
            return text
        if replied.author.id == self.user.id or await self._stored(message.channel.id, reply_to):
            return text
        return with_quote(text, replied)

    async def _stored(self, channel_id: int, message_id: str) -> StoredMessage | None:
        return await self.service.store.find_platform_message(PLATFORM, str(channel_id), message_id)

    async def _say(self, message: discord.Message, text: str) -> None:
        """A short message replying to `message` (refusals, hints, errors)."""
        msg = Incoming(PLATFORM, str(message.channel.id), str(message.author.id), text)
        sink = self.sink(ChannelTarget(message.channel, message), message.channel.id, msg)
        try:
            await sink.notice(text)
        except discord.HTTPException as exc:
            log.warning("discord: could not send a notice in %s: %s", message.channel.id, exc)
        finally:
            await sink.close()

    # reactions ---------------------------------------------------------------------------
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        """👍/👎 on one of our answers is a rating (raw: works for uncached messages)."""
        if payload.member is None or not payload.member.bot:
            await self._on_reaction(payload, withdraw=False)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        """A 👍/👎 taken back withdraws that rating (if it was the user's latest)."""
        await self._on_reaction(payload, withdraw=True)

    async def _on_reaction(self, payload: discord.RawReactionActionEvent, withdraw: bool) -> None:
        rating = rating_of(payload.emoji)
        if rating is None or self.user is None or payload.user_id == self.user.id:
            return
        with self.tracked():
            try:
                await self._rate(payload, rating, withdraw)
            except Exception:
                log.exception("discord: rating on %s failed", payload.message_id)

    async def _rate(
        self, payload: discord.RawReactionActionEvent, rating: int, withdraw: bool
    ) -> None:
        if payload.guild_id is None:
            place = Place(None, (payload.channel_id,))
        else:
            channel = self.get_channel(payload.channel_id)
            place = place_of(channel or discord.Object(payload.channel_id), payload.guild_id)
        user = payload.member or discord.Object(payload.user_id)
        # Nothing of a disallowed user is stored; withdrawing touches only the user's own
        # rating (a removal event carries no member, so no roles to check).
        if not withdraw and not await self.access.allows(self, user, place):
            return
        ours = await self._stored(payload.channel_id, str(payload.message_id))
        if ours is not None and ours.role == "assistant":
            store = self.service.store
            change = store.unrate if withdraw else store.rate
            await change(ours.id, str(payload.user_id), rating)


def _where(place: Place) -> str:
    """For logs: the ids an admin would put in the allow-lists."""
    if place.is_dm:
        return "a DM"
    return f"guild {place.guild_id} channel {'/'.join(map(str, place.channel_ids))}"


async def run_discord(service: ChatService, cfg: DiscordConfig, *, grace_s: float = 5.0) -> None:
    """Run the Discord bot until cancelled; then let running replies finish (up to
    `grace_s`) and close the connection cleanly."""
    token = read_secret("discord", cfg.token_env, cfg.token_file)
    client = DiscordBot(service, cfg, grace_s=grace_s)
    source = f"token_file {cfg.token_file}" if cfg.token_file else f"${cfg.token_env}"
    where = cfg.api_base or "Discord"
    with discord_endpoints(cfg.api_base, cfg.gateway_url):
        try:
            log.info("discord: connecting to %s", where)
            await client.start(token)
        except discord.LoginFailure:
            raise ConfigError(f"[discord] Discord rejected the bot token from {source}") from None
        except discord.PrivilegedIntentsRequired:
            raise ConfigError(
                "[discord] the bot may not read message content: enable Message Content Intent "
                "in the Developer Portal (your application → Bot → Privileged Gateway Intents)"
            ) from None
        finally:
            await client.close()
            log.info("discord: stopped")
