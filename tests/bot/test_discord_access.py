"""Allow-lists, slash commands and 👍/👎 ratings, through the real discord.py and the
fake Discord (the harness lives in test_discord_bot.py)."""

from __future__ import annotations

import pytest

from bot.service import ADMIN_ONLY, REFUSED
from tests.bot.test_discord_bot import ANSWER, World, answered, settle
from tests.bot.test_discord_bot import world as world  # noqa: F401 - the fixture

pytestmark = pytest.mark.filterwarnings("error")


async def test_disallowed_user_is_refused_once_and_nothing_is_stored(world: World) -> None:
    guild = world.fake.add_guild("lab")
    alice, bob = world.fake.add_user("alice"), world.fake.add_user("bob")
    bot = await world.start(allowed_users=(int(alice["id"]),))
    channel = guild.text_channel_id
    asked = await world.fake.user_message(channel, bob, "let me in", mentions_bot=True)
    [refusal] = await answered(world.fake, channel, REFUSED)
    assert refusal.reply_to_id == asked.id
    await world.fake.user_message(channel, bob, "please?", mentions_bot=True)
    record = await world.fake.slash_command("ask", {"question": "sneaky"}, bob, channel)
    await world.fake.wait_for(lambda: record.original is not None)
    assert record.original.ephemeral and record.original.content == REFUSED
    await world.fake.user_message(channel, alice, "hi", mentions_bot=True)
    [answer] = await answered(world.fake, channel)
    await world.fake.add_reaction(channel, answer.id, bob, "👎")
    await settle(bot)
    # One refusal in the channel (the slash command's is visible to bob only).
    assert [m.content for m in world.fake.bot_messages(channel)] == [REFUSED, ANSWER]
    assert bot.rows() == [("user", "hi"), ("assistant", ANSWER)]
    assert bot.ratings() == []


async def test_roles_channels_and_admins(world: World) -> None:
    guild = world.fake.add_guild("lab", channels=["general", "bots"], roles=["helpers"])
    alice, carol, root = (world.fake.add_user(n) for n in ("alice", "carol", "root"))
    world.fake.add_member(guild.id, alice, roles=["helpers"])
    world.fake.add_member(guild.id, carol)
    world.fake.add_member(guild.id, root)
    general, bots = guild.channel_id("general"), guild.channel_id("bots")
    bot = await world.start(
        allowed_roles=(int(guild.role_id("helpers")),),
        allowed_channels=(int(bots),),
        admins=(int(root["id"]),),
    )
    thread = (await world.fake.add_thread(bots, "deep dive", owner=alice))["id"]
    await world.fake.user_message(bots, alice, "role holder here", mentions_bot=True)
    await world.fake.user_message(thread, alice, "threads of #bots too", mentions_bot=True)
    await world.fake.user_message(bots, carol, "no role", mentions_bot=True)
    await world.fake.user_message(general, alice, "wrong channel", mentions_bot=True)
    await world.fake.user_message(general, root, "admin anywhere", mentions_bot=True)
    await answered(world.fake, bots)
    await answered(world.fake, thread)
    await answered(world.fake, bots, REFUSED)
    await answered(world.fake, general, REFUSED)
    await answered(world.fake, general)
    await world.fake.wait_for(lambda: len(bot.rows()) == 6)
    asked = {text for role, text in bot.rows() if role == "user"}
    assert asked == {"role holder here", "threads of #bots too", "admin anywhere"}


async def test_dms_follow_allow_dms_and_roles_held_in_a_server(world: World) -> None:
    guild = world.fake.add_guild("lab", roles=["helpers"])
    alice, carol = world.fake.add_user("alice"), world.fake.add_user("carol")
    world.fake.add_member(guild.id, alice, roles=["helpers"])
    bot = await world.start(allowed_roles=(int(guild.role_id("helpers")),))
    alice_dm, carol_dm = world.fake.open_dm(alice), world.fake.open_dm(carol)
    await world.fake.user_message(alice_dm, alice, "I hold the role")
    await world.fake.user_message(carol_dm, carol, "I do not")
    await answered(world.fake, alice_dm)
    await answered(world.fake, carol_dm, REFUSED)
    await bot.stop()

    closed = await world.start(allow_dms=False)
    ask = next(c for c in world.fake.commands() if c["name"] == "ask")
    assert ask["contexts"] == [0]  # Discord hides the commands in DMs
    await world.fake.user_message(alice_dm, alice, "still there?")
    await answered(world.fake, alice_dm, REFUSED)
    await settle(closed)
    assert [r[1] for r in closed.rows() if r[0] == "user"] == ["I hold the role"]


async def test_slash_help_and_reset(world: World) -> None:
    guild = world.fake.add_guild("lab")
    bot = await world.start()
    channel = guild.text_channel_id
    helped = await world.fake.slash_command("help", None, "alice", channel)
    await world.fake.wait_for(lambda: helped.original is not None)
    assert helped.original.ephemeral and "/ask" in helped.original.content
    await world.fake.user_message(channel, "alice", "remember this", mentions_bot=True)
    await answered(world.fake, channel)
    reset = await world.fake.slash_command("reset", None, "alice", channel)
    await world.fake.wait_for(
        lambda: reset.original and "new conversation" in reset.original.content
    )
    assert reset.deferred and reset.acked_in_time and not reset.original.ephemeral
    await world.fake.user_message(channel, "alice", "fresh start", mentions_bot=True)
    [*_, fresh] = await answered(world.fake, channel, count=2)
    assert await bot.chain_of(channel, fresh.id) == ["fresh start", ANSWER]
    assert len(bot.rows()) == 4  # the old conversation is kept


async def test_slash_ask_in_a_dm_continues_the_dm(world: World) -> None:
    bot = await world.start()
    dm = world.fake.open_dm("carol")
    await world.fake.user_message(dm, "carol", "hello")
    await answered(world.fake, dm)
    record = await world.fake.slash_command("ask", {"question": "and then?"}, "carol", dm)
    await world.fake.wait_for(lambda: record.original and record.original.content == ANSWER)
    chain = await bot.chain_of(dm, record.original.id)
    assert chain == ["hello", ANSWER, "and then?", ANSWER]


async def test_reactions_rate_answers_in_servers_and_dms(world: World) -> None:
    guild = world.fake.add_guild("lab")
    alice, carol = world.fake.add_user("alice"), world.fake.add_user("carol")
    bot = await world.start()
    channel, dm = guild.text_channel_id, world.fake.open_dm(carol)
    question = await world.fake.user_message(channel, alice, "rate me", mentions_bot=True)
    [in_server] = await answered(world.fake, channel)
    await world.fake.user_message(dm, carol, "me too")
    [in_dm] = await answered(world.fake, dm)
    await bot.chain_of(dm, in_dm.id)  # both answers are linked by now
    await bot.chain_of(channel, in_server.id)
    await world.fake.add_reaction(channel, question.id, alice, "👍")  # not our answer
    await world.fake.add_reaction(channel, in_server.id, "bob", "🔥")  # not a rating
    await world.fake.add_reaction(channel, in_server.id, alice, "👍🏽")
    await world.fake.add_reaction(dm, in_dm.id, carol, "👎")
    await world.fake.wait_for(lambda: len(bot.ratings()) == 2)
    await settle(bot)
    assert sorted(bot.ratings()) == sorted([(alice["id"], 1), (carol["id"], -1)])


async def test_forget_deletes_what_is_stored_about_the_user(world: World) -> None:
    guild = world.fake.add_guild("lab")
    alice, bob = world.fake.add_user("alice"), world.fake.add_user("bob")
    bot = await world.start()
    channel = guild.text_channel_id
    await world.fake.user_message(channel, alice, "mine", mentions_bot=True)
    [answer] = await answered(world.fake, channel)
    await world.fake.user_message(channel, bob, "theirs", mentions_bot=True)
    await answered(world.fake, channel, count=2)
    await bot.chain_of(channel, answer.id)
    await world.fake.add_reaction(channel, answer.id, alice, "👍")
    await world.fake.wait_for(lambda: bot.ratings())
    unsure = await world.fake.slash_command("forget", {"confirm": False}, alice, channel)
    await world.fake.wait_for(lambda: unsure.original and not unsure.original.loading)
    assert "Nothing deleted" in unsure.original.content and len(bot.rows()) == 4
    sure = await world.fake.slash_command("forget", {"confirm": True}, alice, channel)
    await world.fake.wait_for(lambda: sure.original and not sure.original.loading)
    assert sure.original.ephemeral and "Deleted 2 stored messages" in sure.original.content
    assert bot.rows() == [("user", "theirs"), ("assistant", ANSWER)]
    assert bot.ratings() == []


async def test_stats_are_for_admins_only(world: World) -> None:
    guild = world.fake.add_guild("lab")
    root = world.fake.add_user("root")
    await world.start(admins=(int(root["id"]),))
    channel = guild.text_channel_id
    await world.fake.user_message(channel, "alice", "count me", mentions_bot=True)
    await answered(world.fake, channel)
    denied = await world.fake.slash_command("stats", None, "alice", channel)
    shown = await world.fake.slash_command("stats", None, root, channel)
    await world.fake.wait_for(lambda: shown.original and not shown.original.loading)
    assert denied.original is not None and denied.original.content == ADMIN_ONLY
    assert shown.original.ephemeral
    assert "Discord: 1 users, 1 conversations, 2 messages" in shown.original.content
