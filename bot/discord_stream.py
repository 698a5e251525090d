"""Streaming a reply into Discord: a message that grows by edits and continues in
follow-up messages at Discord's length limit, throttled per channel.

The first message goes out as soon as there is text; after that the bot writes to a
channel at most once per `edit_interval_s` (edits and follow-ups alike: Discord allows
about 5 message writes per 5 s per channel, and 50 requests/s per bot overall), merging
whatever arrived meanwhile. An edit that would not change the message is never sent.
Nothing is truncated: the parts of a reply, joined, are the reply (the last one without
trailing whitespace, which Discord would drop anyway).

`update` never waits for Discord: a background flusher does the writes, so a slow or
rate-limited channel never holds up the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import discord

from bot.discord_pacing import Throttle, retry_after
from bot.discord_split import Splitter

log = logging.getLogger(__name__)

CONTENT_LIMIT = 2000  # characters of a message's content
EMBED_LIMIT = 4096  # characters of an embed's description
EMBED_COLOUR = 0x5865F2
TYPING_AFTER_S = 0.5  # a model that answers faster needs no "typing..." (a request less)
TYPING_EVERY_S = 8.0  # Discord shows "typing..." for 10 s per request
INTERRUPT_TIMEOUT_S = 3.0
MAX_OWN_RETRIES = 5

Output = Literal["plain", "embed"]
OnDone = Callable[[int, list[str]], Awaitable[None]]


def render(output: Output, text: str) -> dict[str, Any]:
    """The keyword arguments of a send/edit that shows `text`."""
    if output == "embed":
        return {"embed": discord.Embed(description=text, colour=EMBED_COLOUR)}
    return {"content": text}


def limit_of(output: Output) -> int:
    return EMBED_LIMIT if output == "embed" else CONTENT_LIMIT


# -- where a reply goes ---------------------------------------------------------------
class Target(Protocol):
    async def post(self, body: dict[str, Any], *, first: bool) -> Any:
        """Send a new message (the first one answers the user); returns it."""

    async def edit(self, message: Any, body: dict[str, Any]) -> Any:
        """Edit a message this target posted; returns the edited message."""

    async def typing(self) -> None: ...


class ChannelTarget:
    """A reply in a channel, thread or DM: the first message replies to the user's."""

    def __init__(self, channel: discord.abc.Messageable, question: discord.Message) -> None:
        self._channel = channel
        self._question = question

    async def post(self, body: dict[str, Any], *, first: bool) -> Any:
        if first:
            reference = self._question.to_reference(fail_if_not_exists=False)
            return await self._channel.send(**body, reference=reference)
        return await self._channel.send(**body)

    async def edit(self, message: Any, body: dict[str, Any]) -> Any:
        return await message.edit(**body)

    async def typing(self) -> None:
        await self._channel.typing()


class InteractionTarget:
    """The answer to a deferred slash command: the first message completes the
    "thinking..." response, the rest are follow-ups."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self._interaction = interaction

    async def post(self, body: dict[str, Any], *, first: bool) -> Any:
        if first:
            return await self._interaction.edit_original_response(**body)
        return await self._interaction.followup.send(**body, wait=True)

    async def edit(self, message: Any, body: dict[str, Any]) -> Any:
        return await message.edit(**body)

    async def typing(self) -> None:
        """Discord already shows "thinking..." for a deferred command."""


# -- the sink ---------------------------------------------------------------------------
@dataclass
class _Part:
    message: Any
    text: str


class DiscordSink:
    """A ReplySink for one answer on Discord."""

    def __init__(
        self,
        target: Target,
        throttle: Throttle,
        output: Output,
        on_done: OnDone | None = None,
    ) -> None:
        self._target = target
        self._throttle = throttle
        self._output = output
        self._on_done = on_done
        self._splitter = Splitter(limit_of(output))
        self._parts: list[_Part] = []
        self._posted = 0  # messages sent, notices included
        self._attempts = 0
        self._dead = False  # Discord forbids us to write here: stop trying
        self._latest = ""
        self._final = False
        self._dirty = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._typist: asyncio.Task[None] | None = None

    @property
    def posted(self) -> bool:
        return self._posted > 0

    @property
    def message_ids(self) -> list[str]:
        return [str(part.message.id) for part in self._parts]

    async def notice(self, text: str) -> None:
        await self._drain()
        if self._dead:
            return
        for chunk in Splitter(limit_of(self._output)).parts(text):
            await self._post(chunk)

    async def typing(self) -> None:
        if self._typist is None and not self._posted:
            self._typist = asyncio.create_task(self._keep_typing())

    async def update(self, text: str) -> None:
        self._latest = text
        self._kick()

    async def finish(self, text: str, reply_id: int) -> None:
        """Show the whole reply, and link its messages to the stored reply: those
        already shown at once (a reply to them must continue this conversation even if
        the process stops now), the rest after the final edits."""
        self._latest = text
        shown = self.message_ids
        if self._on_done is not None and shown:
            await self._on_done(reply_id, shown)
        await self._drain()
        if self._on_done is not None and self.message_ids != shown:
            await self._on_done(reply_id, self.message_ids)

    async def interrupt(self, note: str) -> None:
        """The reply was cut short (shutdown): show what there is and say so, briefly."""
        await self.close()
        try:
            async with asyncio.timeout(INTERRUPT_TIMEOUT_S):
                if self._latest:
                    await self._sync()
                if not self._dead:
                    await self._post(note)
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("discord: could not tell that a reply was cut short: %s", exc)

    async def close(self) -> None:
        """Stop background work (on errors and cancellation; finish() needs none)."""
        tasks = {t for t in (self._flusher, self._typist) if t is not None and not t.done()}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # (a cancellation of our own still propagates)

    # internals ----------------------------------------------------------------------
    def _kick(self) -> None:
        self._dirty.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _drain(self) -> None:
        """Show the latest text in full, then stop the flusher."""
        if not self._latest and self._flusher is None:
            return
        self._final = True
        self._kick()
        assert self._flusher is not None
        await self._flusher

    async def _flush(self) -> None:
        retries = 0
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            final = self._final
            try:
                await self._sync()
                retries = 0
            except discord.Forbidden as exc:
                log.warning(
                    "discord: forbidden to write this reply (%s); giving up on it", exc.text
                )
                self._dead = True
                return
            except discord.HTTPException as exc:
                wait = retry_after(exc)
                if wait is not None and retries < MAX_OWN_RETRIES:
                    retries += 1  # a 429 discord.py would not retry: wait it out ourselves
                    await asyncio.sleep(wait)
                    self._dirty.set()
                    continue
                log.warning("discord: a reply update was refused (%s %s)", exc.status, exc.text)
            if final:
                return

    async def _sync(self) -> None:
        """Bring the messages up to the latest text, one write per turn. A write shows
        the text as it is when its turn comes (not when it was queued)."""
        while not self._dead:
            change = self._next_change()
            if change is None:
                return
            async with self._throttle.turn(wait=self._attempts > 0):
                await self._write(*(self._next_change() or change))

    def _next_change(self) -> tuple[int, str] | None:
        """The first part that is not shown as it should be, and its text."""
        for index, chunk in enumerate(self._splitter.parts(self._latest)):
            if index >= len(self._parts) or self._parts[index].text != chunk:
                return index, chunk
        return None

    async def _write(self, index: int, chunk: str) -> None:
        if index >= len(self._parts):
            self._parts.append(_Part(await self._send(chunk), chunk))
            return
        part = self._parts[index]
        self._attempts += 1
        body = render(self._output, chunk)
        try:
            part.message = await self._target.edit(part.message, body)
        except discord.NotFound:  # deleted meanwhile: show this part anew
            part.message = await self._target.post(body, first=False)
        part.text = chunk

    async def _post(self, chunk: str) -> Any:
        async with self._throttle.turn(wait=self._attempts > 0):
            return await self._send(chunk)

    async def _send(self, chunk: str) -> Any:
        """A new message (the first one answers the user); the caller holds the turn."""
        self._attempts += 1
        message = await self._target.post(render(self._output, chunk), first=not self._posted)
        self._posted += 1
        if self._typist is not None:
            self._typist.cancel()
        return message

    async def _keep_typing(self) -> None:
        """Show "lorabot is typing..." until the first message, unless text comes at once."""
        await asyncio.sleep(TYPING_AFTER_S)
        while not self._posted:
            await self._throttle.spaced()
            try:
                await self._target.typing()
            except discord.HTTPException as exc:
                log.debug("typing indicator refused: %s", exc)
                return
            await asyncio.sleep(TYPING_EVERY_S)
