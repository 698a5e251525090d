"""FakeDiscord driven by the REAL discord.py client over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import AsyncIterator

import aiohttp
import discord
import discord.gateway
import pytest
import pytest_asyncio
from discord import app_commands

from tests.fakes.discord_server import FakeDiscord, patched_discord_py

pytestmark = [pytest.mark.asyncio, pytest.mark.filterwarnings("error")]

UNCACHED_MESSAGE_ID = 1_234_567_890_123_456_789


async def _assert_nothing_leaked() -> None:
    """No asyncio tasks or discord.py heartbeat threads may outlive a test."""
    current = asyncio.current_task()
    deadline = time.monotonic() + 2.0
    while True:
        tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        threads = [
            t
            for t in threading.enumerate()
            if isinstance(t, discord.gateway.KeepAliveHandler) and t.is_alive()
        ]
        if not tasks and not threads:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked tasks={tasks} heartbeat threads={threads}")
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord()
    await server.start()
    try:
        with patched_discord_py(server):
            yield server
    finally:
        await server.stop()
    await _assert_nothing_leaked()


def make_client(*, message_content: bool = True) -> discord.Client:
    intents = discord.Intents.default()  # guilds, guild/dm messages, reactions, typing...
    intents.message_content = message_content
    # A short guild_ready_timeout keeps on_ready from waiting the default 2 s after the last GUILD_CREATE.
    return discord.Client(intents=intents, guild_ready_timeout=0.05)


@contextlib.asynccontextmanager
async def running(client: discord.Client, fake: FakeDiscord) -> AsyncIterator[discord.Client]:
    """Run ``client.start`` until ready; always close it and join the task."""
    task = asyncio.create_task(client.start(fake.token))
    try:
        await fake.wait_for(lambda: client.is_ready() or task.done(), timeout=10)
        if task.done():
            task.result()  # surfaces login/connect errors
        yield client
    finally:
        await client.close()
        await asyncio.wait_for(task, timeout=5)


async def test_login_ready_and_guild_cache(fake: FakeDiscord) -> None:
    guild = fake.add_guild(
        "lab", channels=["general", {"name": "Voice", "type": 2}], roles=["mods"]
    )
    alice = fake.add_user("alice")
    fake.add_member(guild.id, alice, roles=["mods"])
    client = make_client()
    readies: list[bool] = []

    @client.event
    async def on_ready() -> None:
        readies.append(True)

    async with running(client, fake):
        await fake.wait_for(lambda: readies)
        assert client.user is not None and client.user.id == int(fake.bot_user["id"])
        assert client.user.name == "lorabot" and client.user.bot
        assert client.application_id == int(fake.application_id)
        cached = client.get_guild(int(guild.id))
        assert cached is not None and cached.name == "lab"
        assert isinstance(cached.get_channel(int(guild.text_channel_id)), discord.TextChannel)
        assert isinstance(cached.get_channel(int(guild.channel_id("Voice"))), discord.VoiceChannel)
        assert cached.me is not None and discord.utils.get(cached.roles, name="mods") is not None
    assert fake.identify_count == 1
    assert [r.path for r in fake.requests[:2]] == ["/users/@me", "/oauth2/applications/@me"]
    assert fake.gateway_urls[0].startswith("/gateway?v=10&encoding=json&compress=")


async def test_live_guild_join_dispatches_guild_join(fake: FakeDiscord) -> None:
    fake.add_guild("lab")
    client = make_client()
    joined: list[discord.Guild] = []

    @client.event
    async def on_guild_join(guild: discord.Guild) -> None:
        joined.append(guild)

    async with running(client, fake):
        later = fake.add_guild("second", channels=["chat"])
        await fake.wait_for(lambda: joined)
        assert joined[0].id == int(later.id) and joined[0].get_channel(int(later.text_channel_id))


async def test_guild_message_reply_and_edit(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    channel_id = guild.text_channel_id
    client = make_client()
    seen: list[discord.Message] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message)
        if message.author == client.user:
            return
        reply = await message.reply(f"echo: {message.clean_content}")
        await reply.edit(content=reply.content + " (edited)")

    async with running(client, fake):
        asked = await fake.user_message(channel_id, "alice", "hello", mentions_bot=True)
        await fake.wait_for(lambda: any(m.edit_count == 1 for m in fake.bot_messages(channel_id)))
        # Discord echoes the bot's own messages; the handler above must ignore them.
        await fake.wait_for(lambda: any(m.author == client.user for m in seen))

    first = seen[0]
    assert first.guild is not None and first.guild.id == int(guild.id)
    assert first.content == f"<@{fake.bot_user['id']}> hello" and client.user in first.mentions
    reply = fake.bot_messages(channel_id)[0]
    assert reply.content == "echo: @lorabot hello (edited)"
    assert reply.content_history == ["echo: @lorabot hello", "echo: @lorabot hello (edited)"]
    assert reply.reply_to_id == asked.id and reply.type == 19 and reply.edit_count == 1
    assert [m.id for m in fake.channel_messages(channel_id)] == [asked.id, reply.id]


async def test_message_limits_return_discord_errors(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    client = make_client()
    async with running(client, fake):
        channel = client.get_channel(int(guild.text_channel_id))
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as too_long:
            await channel.send("x" * 2001)
        assert too_long.value.status == 400 and too_long.value.code == 50035
        assert "content" in too_long.value.text and "2000" in too_long.value.text
        ok = await channel.send("x" * 2000)
        with pytest.raises(discord.HTTPException) as big_embed:
            await channel.send(embed=discord.Embed(description="d" * 4097))
        assert "embeds.0.description" in big_embed.value.text
        with pytest.raises(discord.HTTPException) as total:
            await channel.send(
                embeds=[
                    discord.Embed(description="d" * 4000),
                    discord.Embed(description="d" * 2001),
                ]
            )
        assert "6000" in total.value.text
        with pytest.raises(discord.HTTPException) as bad_edit:
            await ok.edit(content="y" * 2001)
        assert bad_edit.value.code == 50035
        with pytest.raises(discord.HTTPException) as empty:
            await channel.send("")
        assert empty.value.code == 50006
    stored = fake.channel_messages(guild.text_channel_id)
    assert [(m.content, m.edit_count) for m in stored] == [("x" * 2000, 0)]


async def test_injected_429_is_retried_by_discord_py(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    injected = fake.inject_429("POST", r"/channels/\d+/messages", retry_after=0.3)
    global_limit = fake.inject_429("POST", r"/channels/\d+/typing", retry_after=0.2, global_=True)
    client = make_client()
    async with running(client, fake):
        channel = client.get_channel(int(guild.text_channel_id))
        assert isinstance(channel, discord.TextChannel)
        sent = await channel.send("after the rate limit")
        await channel.typing()
    calls = fake.requests_to("POST", r"/channels/\d+/messages")
    assert [c.status for c in calls] == [429, 200]
    assert calls[1].timestamp - calls[0].timestamp >= 0.3
    assert [c.status for c in fake.requests_to("POST", r"/channels/\d+/typing")] == [429, 204]
    assert injected.hits == 1 and global_limit.hits == 1
    assert fake.message(sent.id).content == "after the rate limit"


async def test_route_bucket_headers_make_discord_py_throttle(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    fake.limit_route("PATCH", r"/channels/\d+/messages/\d+", limit=2, per=0.4)
    client = make_client()
    async with running(client, fake):
        channel = client.get_channel(int(guild.text_channel_id))
        assert isinstance(channel, discord.TextChannel)
        msg = await channel.send("v0")
        for version in range(1, 5):
            msg = await msg.edit(content=f"v{version}")
    edits = fake.requests_to("PATCH", r"/channels/\d+/messages/\d+")
    # discord.py read X-RateLimit-Remaining: 0 and waited instead of hitting 429.
    assert [e.status for e in edits] == [200] * 4
    assert edits[2].timestamp - edits[0].timestamp >= 0.35
    assert fake.message(msg.id).content_history == ["v0", "v1", "v2", "v3", "v4"]


async def test_slash_command_sync_defer_and_followups(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    channel_id = guild.text_channel_id
    client = make_client()
    tree = app_commands.CommandTree(client)

    @tree.command(name="ask", description="Ask lorabot something")
    @app_commands.describe(prompt="What to ask")
    async def ask(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer()
        await asyncio.sleep(0.05)
        await interaction.followup.send(f"answer to {prompt}")
        await interaction.followup.send("only for you", ephemeral=True)

    async def setup_hook() -> None:
        await tree.sync()
        tree.copy_global_to(guild=discord.Object(id=int(guild.id)))
        await tree.sync(guild=discord.Object(id=int(guild.id)))

    client.setup_hook = setup_hook  # type: ignore[method-assign]
    async with running(client, fake):
        assert [c["name"] for c in fake.commands()] == ["ask"]
        option = fake.commands(guild.id)[0]["options"][0]
        assert (option["name"], option["type"], option["required"]) == ("prompt", 3, True)
        with pytest.raises(LookupError):
            await fake.slash_command("nope", None, "alice", channel_id)
        record = await fake.slash_command("ask", {"prompt": "life"}, "alice", channel_id)
        await fake.wait_for(lambda: record.followups)

    assert record.deferred and record.acked_in_time and record.ack_latency is not None
    assert record.original is not None and not record.original.loading
    assert record.original.content == "answer to life" and not record.original.ephemeral
    assert [(m.content, m.ephemeral) for m in record.followups] == [("only for you", True)]
    assert fake.interaction_responses(record.id) is record
    assert [m.content for m in fake.channel_messages(channel_id)] == ["answer to life"]


async def test_immediate_response_edit_original_and_dm_command(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    alice = fake.add_user("alice")
    fake.add_member(guild.id, alice)
    client = make_client()
    tree = app_commands.CommandTree(client)
    done: list[str] = []

    @tree.command(name="greet", description="Greets someone")
    async def greet(interaction: discord.Interaction, who: discord.User, times: int = 1) -> None:
        await interaction.response.send_message(f"hi {who.name} x{times}")
        await interaction.edit_original_response(content=f"hello {who.name} x{times}")
        followup = await interaction.followup.send("more", wait=True)
        await followup.edit(content="more (edited)")
        done.append("guild" if interaction.guild else "dm")

    async def setup_hook() -> None:
        await tree.sync()

    client.setup_hook = setup_hook  # type: ignore[method-assign]
    async with running(client, fake):
        in_guild = await fake.slash_command(
            "greet", {"who": alice, "times": 2}, alice, guild.text_channel_id
        )
        await fake.wait_for(lambda: done == ["guild"])
        in_dm = await fake.slash_command("greet", {"who": alice}, alice, fake.open_dm(alice))
        await fake.wait_for(lambda: done == ["guild", "dm"])

    assert in_guild.callback_type == 4 and not in_guild.deferred and in_guild.acked_in_time
    assert [(m.content, m.edit_count) for m in in_guild.messages] == [
        ("hello alice x2", 1),
        ("more (edited)", 1),
    ]
    assert in_dm.guild_id is None and in_dm.messages[0].content == "hello alice x1"
    assert [m.content for m in fake.channel_messages(guild.text_channel_id)] == [
        "hello alice x2",
        "more (edited)",
    ]


async def test_threads_files_and_history(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    client = make_client()
    downloaded: list[bytes] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.attachments and message.author != client.user:
            downloaded.append(await message.attachments[0].read())

    async with running(client, fake):
        channel = client.get_channel(int(guild.text_channel_id))
        assert isinstance(channel, discord.TextChannel)
        root = await channel.send(
            "root", file=discord.File(io.BytesIO(b"lora weights"), "notes.txt")
        )
        thread = await root.create_thread(name="discussion")
        await thread.send("bot in thread")
        await fake.user_message(
            thread.id, "alice", "user in thread", attachments=[("prompt.txt", b"hi")]
        )
        await fake.wait_for(lambda: downloaded)
        history = [m.content async for m in thread.history(limit=10)]
        assert (await channel.fetch_message(root.id)).attachments[0].filename == "notes.txt"
        await root.delete()

    assert (
        thread.id == root.id
        and fake.guild(guild.id).threads[str(thread.id)]["name"] == "discussion"
    )
    assert history == ["user in thread", "bot in thread"]  # Discord returns newest first
    assert downloaded == [b"hi"]
    assert fake.requests_to("POST", r"/channels/\d+/messages")[0].files == ["notes.txt"]
    assert fake.channel_messages(guild.text_channel_id) == [] and fake.message(root.id).deleted


async def test_late_interaction_ack_fails_like_discord(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    fake.interaction_ack_timeout = 0.1  # Discord's 3 s window, shrunk to keep the test fast
    client = make_client()
    tree = app_commands.CommandTree(client)
    errors: list[BaseException] = []

    @tree.command(name="slow", description="Answers too late")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.2)
        try:
            await interaction.response.send_message("too late")
        except discord.NotFound as exc:
            errors.append(exc)

    async def setup_hook() -> None:
        await tree.sync()

    client.setup_hook = setup_hook  # type: ignore[method-assign]
    async with running(client, fake):
        record = await fake.slash_command("slow", None, "alice", guild.text_channel_id)
        await fake.wait_for(lambda: errors)
    assert isinstance(errors[0], discord.NotFound) and errors[0].code == 10062
    assert record.callback_type is None and record.late_callbacks == 1 and not record.acked_in_time


async def test_reactions_raw_event_and_bot_reaction(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    bob = fake.add_user("bob")
    fake.add_member(guild.id, bob)
    client = make_client()
    raw_events: list[discord.RawReactionActionEvent] = []

    @client.event
    async def on_raw_reaction_add(payload: discord.RawReactionActionEvent) -> None:
        raw_events.append(payload)

    async with running(client, fake):
        await fake.add_reaction(guild.text_channel_id, UNCACHED_MESSAGE_ID, bob, "🔥")
        await fake.wait_for(lambda: raw_events)
        channel = client.get_channel(int(guild.text_channel_id))
        assert isinstance(channel, discord.TextChannel)
        msg = await channel.send("react to me")
        await msg.add_reaction("✅")
        with pytest.raises(discord.HTTPException) as bad_emoji:
            await msg.add_reaction("thumbsup")
        assert bad_emoji.value.code == 10014
        await fake.wait_for(
            lambda: len(raw_events) == 2
        )  # Discord echoes the bot's own reaction too

    event = raw_events[0]
    assert event.message_id == UNCACHED_MESSAGE_ID and event.user_id == int(bob["id"])
    assert (
        event.emoji.name == "🔥"
        and event.guild_id == int(guild.id)
        and event.event_type == "REACTION_ADD"
    )
    assert event.member is not None and event.member.name == "bob"
    assert fake.message(msg.id).reactions == [("✅", fake.bot_user["id"])]


async def test_direct_message_round_trip(fake: FakeDiscord) -> None:
    fake.add_guild("lab")
    carol = fake.add_user("carol")
    dm_id = fake.open_dm(carol)
    client = make_client()
    seen: list[discord.Message] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author == client.user:
            return
        seen.append(message)
        await message.channel.send("hi in DM")

    async with running(client, fake):
        await fake.user_message(dm_id, carol, "hello bot")
        await fake.wait_for(lambda: fake.bot_messages(dm_id))
        user = await client.fetch_user(int(carol["id"]))
        await user.send("proactive")

    assert seen[0].guild is None and isinstance(seen[0].channel, discord.DMChannel)
    assert seen[0].content == "hello bot"
    assert [m.content for m in fake.channel_messages(dm_id)] == [
        "hello bot",
        "hi in DM",
        "proactive",
    ]


async def test_message_content_intent_is_enforced(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    client = make_client(message_content=False)
    contents: list[str] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        contents.append(message.content)

    async with running(client, fake):
        await fake.user_message(guild.text_channel_id, "alice", "secret")
        await fake.user_message(guild.text_channel_id, "alice", "hey", mentions_bot=True)
        await fake.wait_for(lambda: len(contents) == 2)
    assert contents == ["", f"<@{fake.bot_user['id']}> hey"]


async def test_gateway_drop_resumes_and_replays_missed_events(fake: FakeDiscord) -> None:
    guild = fake.add_guild("lab")
    client = make_client()
    seen: list[str] = []
    resumed: list[bool] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message.content)

    @client.event
    async def on_resumed() -> None:
        resumed.append(True)

    async with running(client, fake):
        await fake.drop_connections(4000)
        await fake.user_message(guild.text_channel_id, "alice", "while you were away")
        await fake.wait_for(lambda: resumed and "while you were away" in seen)
    assert fake.identify_count == 1 and fake.resume_count == 1


async def test_bad_token_and_raw_http_errors(fake: FakeDiscord) -> None:
    client = make_client()
    with pytest.raises(discord.LoginFailure):
        await client.login("not-the-token")
    await client.close()
    assert fake.requests[-1].status == 401

    auth = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{fake.api_base}/nope", headers=auth) as resp:
            assert resp.status == 404 and resp.headers["Content-Type"] == "application/json"
            assert await resp.json() == {"message": "404: Not Found", "code": 0}
        async with session.get(f"{fake.api_base}/channels/1/messages/2", headers=auth) as resp:
            assert resp.status == 404 and (await resp.json())["code"] == 10003
        async with session.get(f"{fake.api_base}/gateway/bot", headers=auth) as resp:
            assert (await resp.json())["url"] == fake.gateway_url
        async with session.get(f"{fake.api_base}/users/@me") as resp:
            assert resp.status == 401
