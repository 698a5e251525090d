"""The Discord slash commands: /ask question, /reset, /help, /forget, and /stats for
admins.

Discord shows "The application did not respond" unless an interaction is acknowledged
within 3 s, so every command answers or defers before anything slow (the store, the
model, a conversation busy with another reply). Refusals and /help are ephemeral: only
the user who asked sees them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from bot.discord_access import Place, place_of
from bot.discord_stream import InteractionTarget, render
from bot.service import ADMIN_ONLY, EMPTY, FAILED, REFUSED, Incoming

if TYPE_CHECKING:
    from bot.discord_bot import DiscordBot

log = logging.getLogger(__name__)

RESET_DONE = "Started a new conversation."
INTERRUPTED = "⚠️ I was restarted before I could finish this answer. Please ask again."
NO_QUESTION = "Ask me something: `/ask question: your question`."
HELP = """I answer with lorabot's own model.
• In a server: mention me (`@lorabot your question`), reply to one of my messages, or use `/ask`.
• In DMs: just write; every message continues our conversation.
• Reply to any of my answers to continue that conversation.
• `/reset` starts a new conversation here (the old one stays stored).
• React 👍 or 👎 to an answer to rate it.
• `/forget confirm: True` deletes everything stored about you."""
FORGET_ASK = "Nothing deleted. To delete everything stored about you: `/forget confirm: True`."
FORGOTTEN = "Deleted {count} stored messages (yours and the answers to them) and your ratings."


def add_commands(bot: DiscordBot) -> None:
    """Register the commands on the bot's tree (synced to Discord in setup_hook)."""
    tree = bot.tree
    contexts = app_commands.allowed_contexts(
        guilds=True, dms=bot.cfg.allow_dms, private_channels=False
    )

    @tree.command(name="ask", description="Ask lorabot a question")
    @app_commands.describe(question="What you want to ask")
    @contexts
    async def ask(interaction: discord.Interaction, question: str) -> None:
        await run_command(bot, interaction, "ask", question)

    @tree.command(name="reset", description="Start a new conversation here")
    @contexts
    async def reset(interaction: discord.Interaction) -> None:
        await run_command(bot, interaction, "reset")

    @tree.command(name="retry", description="Answer your last message here again")
    @contexts
    async def retry(interaction: discord.Interaction) -> None:
        await run_command(bot, interaction, "retry")

    @tree.command(name="help", description="How to talk to lorabot")
    @contexts
    async def help_(interaction: discord.Interaction) -> None:
        if await admitted(bot, interaction):
            body = render(bot.cfg.output, HELP)
            await interaction.response.send_message(**body, ephemeral=True)

    @tree.command(name="forget", description="Delete everything lorabot stored about you")
    @app_commands.describe(confirm="True to delete your messages, the answers and ratings")
    @contexts
    async def forget(interaction: discord.Interaction, confirm: bool) -> None:
        await forget_user(bot, interaction, confirm)

    @tree.command(name="stats", description="Admins: users, conversations, messages")
    @contexts
    async def stats(interaction: discord.Interaction) -> None:
        await show_stats(bot, interaction)

    @tree.error
    async def on_error(
        interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.CommandNotFound):
            text = f"Unknown command /{error.name}. /help lists the commands."
            await reply_failed(interaction, text)
            return
        log.error("discord: command failed: %s", error, exc_info=error)
        await reply_failed(interaction)


async def admitted(bot: DiscordBot, interaction: discord.Interaction) -> bool:
    """Check access; refuse (ephemerally) those who may not use the bot here."""
    if interaction.guild_id is None:
        place = Place(None, (interaction.channel_id or 0,))
        if bot.access.needs_role_lookup(interaction.user.id, place):
            # A DM is private anyway; deferring first keeps the lookup in the deadline.
            await interaction.response.defer(thinking=True, ephemeral=True)
    else:
        channel = interaction.channel or discord.Object(interaction.channel_id or 0)
        place = place_of(channel, interaction.guild_id)
    if await bot.access.allows(bot, interaction.user, place):
        return True
    log.info(
        "discord: refused user %s (/%s)",
        interaction.user.id,
        interaction.command.name if interaction.command else "?",
    )
    body = render(bot.cfg.output, REFUSED)
    if interaction.response.is_done():
        await interaction.edit_original_response(**body)
    else:
        await interaction.response.send_message(**body, ephemeral=True)
    return False


async def run_command(
    bot: DiscordBot, interaction: discord.Interaction, action: str, question: str = ""
) -> None:
    """/ask (a question), /reset or /retry: deferred, then answered in the channel."""
    if bot.stopping:
        return
    with bot.tracked():
        if not await admitted(bot, interaction):
            return
        if not interaction.response.is_done():
            await interaction.response.defer(thinking=True)
        msg = Incoming(
            platform="discord",
            chat_id=str(interaction.channel_id),
            user_id=str(interaction.user.id),
            text=question if action == "ask" else f"/{action}",
            user_name=interaction.user.display_name,
            is_group=interaction.guild_id is not None,
        )
        sink = bot.sink(InteractionTarget(interaction), interaction.channel_id or 0, msg)
        try:
            async with bot.in_order(msg.chat_id):
                if action == "reset":
                    await bot.service.reset(msg)
                    await sink.notice(RESET_DONE)
                elif action == "retry":
                    await bot.service.retry(msg, sink)
                elif not question.strip():
                    await sink.notice(NO_QUESTION)
                else:
                    await bot.service.reply(msg, question.strip(), sink)
            if not sink.posted:  # the "thinking..." message must never stay
                await sink.notice(EMPTY)
        except asyncio.CancelledError:
            await sink.interrupt(INTERRUPTED)
            raise
        except Exception:
            log.exception("discord: /%s failed", action)
            await reply_failed(interaction)
        finally:
            await sink.close()


async def forget_user(bot: DiscordBot, interaction: discord.Interaction, confirm: bool) -> None:
    """Everyone may have their data deleted, allowed or not (they may have been once)."""
    await interaction.response.defer(thinking=True, ephemeral=True)
    if not confirm:
        await interaction.edit_original_response(content=FORGET_ASK)
        return
    count = await bot.service.store.forget_user("discord", str(interaction.user.id))
    log.info("discord: forgot user %s (%d messages)", interaction.user.id, count)
    await interaction.edit_original_response(content=FORGOTTEN.format(count=count))


async def show_stats(bot: DiscordBot, interaction: discord.Interaction) -> None:
    if not bot.access.is_admin(interaction.user.id):
        await interaction.response.send_message(ADMIN_ONLY, ephemeral=True)
        return
    await interaction.response.defer(thinking=True, ephemeral=True)
    here = await bot.service.store.stats("discord")
    everywhere = await bot.service.store.stats()
    await interaction.edit_original_response(
        content=f"Discord: {_counts(here)}\nAll platforms: {_counts(everywhere)}\n"
        f"Requests waiting for the model: {bot.service.engine.queue_depth}"
    )


async def reply_failed(interaction: discord.Interaction, text: str = FAILED) -> None:
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("discord: could not report a failed command: %s", exc)


def _counts(stats: dict[str, int]) -> str:
    return f"{stats['users']} users, {stats['conversations']} conversations, {stats['messages']} messages"
