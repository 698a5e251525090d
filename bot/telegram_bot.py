"""The Telegram adapter: python-telegram-bot v22 over long polling.

`run_telegram(service, config)` runs until cancelled. PTB's Application is driven by
hand (initialize, start, start_polling ... stop, shutdown) rather than with
`run_polling`, because another platform may share the event loop. Start-up deletes any
webhook (polling and webhooks exclude each other) and keeps pending updates: what users
sent while the bot was down is answered. On shutdown PTB confirms the updates it
fetched, the bot answers them, and replies still running after a grace period are cut
short with a note to the user.

The token is in every Bot API URL, so it is kept out of the logs: httpx (which logs
each URL at INFO) only speaks from WARNING, and every log record is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import logging
import os
import signal
import threading
import traceback
from collections.abc import Iterator
from typing import Any

from telegram import Update
from telegram.error import Conflict, InvalidToken, TelegramError
from telegram.ext import Application, ApplicationBuilder, ContextTypes

from bot.config import read_secret
from bot.service import ChatService
from bot.telegram_config import TelegramConfig
from bot.telegram_handlers import COMMANDS, TelegramHandlers
from bot.telegram_jobs import ChatJobs
from bot.telegram_pacing import Pacer, Pacing
from engine.config import ConfigError

log = logging.getLogger(__name__)

OFFICIAL_ENDPOINT = "https://api.telegram.org/bot"
ALLOWED_UPDATES = ("message", "callback_query")  # edits, reactions, polls...: not ours
MASK = "<telegram-token>"


async def run_telegram(
    service: ChatService,
    config: TelegramConfig,
    *,
    pacing: Pacing | None = None,
    grace_s: float = 5.0,
    poll_timeout_s: int = 10,
    handle_sigterm: bool = True,
) -> None:
    """Serve Telegram until cancelled. `pacing` and `grace_s` (how long shutdown waits
    for running replies) exist for tests; the defaults follow Telegram's limits."""
    token = read_secret("telegram", config.token_env, config.token_file)
    # PTB 22 reports retry_after & co. as timedelta when asked to (ints are deprecated).
    os.environ.setdefault("PTB_TIMEDELTA", "true")
    with hidden_in_logs(token), _sigterm_as_interrupt(handle_sigterm):
        bot = TelegramBot(service, config, pacing or Pacing())
        await bot.run(token, grace_s=grace_s, poll_timeout_s=poll_timeout_s)


class TelegramBot:
    def __init__(self, service: ChatService, config: TelegramConfig, pacing: Pacing) -> None:
        self.config = config
        self.pacer = Pacer(pacing)
        self.jobs = ChatJobs()
        self.handlers = TelegramHandlers(service, config, self.pacer, self.jobs)

    @property
    def endpoint(self) -> str:
        return self.config.base_url or OFFICIAL_ENDPOINT

    def build(self, token: str) -> Application[Any, Any, Any, Any, Any, Any]:
        builder = ApplicationBuilder().token(token)
        if self.config.base_url:
            builder = builder.base_url(self.config.base_url)
            builder = builder.base_file_url(_file_url(self.config.base_url))
        app = builder.build()
        app.add_handlers(self.handlers.handlers())
        app.add_error_handler(_on_error)
        return app

    async def run(self, token: str, *, grace_s: float, poll_timeout_s: int) -> None:
        app = self.build(token)
        await self._initialize(app, token)
        try:
            try:
                await app.bot.set_my_commands(COMMANDS)
            except TelegramError as exc:  # the menu is a convenience; serve anyway
                log.warning("telegram: setMyCommands failed: %s", exc)
            await app.start()
            assert app.updater is not None
            await app.updater.start_polling(
                timeout=dtm.timedelta(seconds=poll_timeout_s),
                allowed_updates=list(ALLOWED_UPDATES),
                drop_pending_updates=False,
                bootstrap_retries=3,  # deleteWebhook through a network hiccup at start
                error_callback=_polling_error,
            )
            log.info("telegram: @%s is polling %s", app.bot.username, self.endpoint)
            await asyncio.Event().wait()  # until cancelled
        finally:
            await self._stop(app, grace_s)

    async def _initialize(self, app: Application[Any, Any, Any, Any, Any, Any], token: str) -> None:
        """getMe: checks the token and the endpoint. Errors name neither the token nor
        a traceback that might hold it."""
        where = self.config.token_file or f"${self.config.token_env}"
        try:
            await app.initialize()
        except InvalidToken:
            await app.bot.shutdown()
            raise ConfigError(
                f"[telegram] the Bot API at {self.endpoint} rejected the token in {where}; "
                "check it with @BotFather"
            ) from None
        except TelegramError as exc:
            await app.bot.shutdown()
            reason = str(exc).replace(token, MASK)
            raise ConfigError(
                f"[telegram] cannot reach the Bot API at {self.endpoint}: {reason}"
            ) from None

    async def _stop(self, app: Application[Any, Any, Any, Any, Any, Any], grace_s: float) -> None:
        """Stop fetching (PTB confirms what it fetched), answer what was fetched, give
        running replies `grace_s`, then close the connections."""
        log.info("telegram: stopping")
        try:
            if app.updater is not None and app.updater.running:
                await app.updater.stop()
            if app.running:
                await app.stop()
            await self.jobs.drain(grace_s)
        finally:
            await app.shutdown()
        log.info("telegram: stopped")


def _file_url(base_url: str) -> str:
    """A local Bot API server serves files beside the API: .../bot -> .../file/bot."""
    return base_url[: -len("bot")] + "file/bot" if base_url.endswith("/bot") else base_url


async def _on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """PTB's one error handler: a handler that failed is logged, the bot goes on."""
    update_id = update.update_id if isinstance(update, Update) else None
    log.error("telegram: handling update %s failed", update_id, exc_info=context.error)


def _polling_error(error: TelegramError) -> None:
    """Called by PTB's polling loop, which retries by itself."""
    if isinstance(error, Conflict):
        log.error("telegram: another process is polling with this bot token; stop it")
    else:
        log.warning("telegram: polling failed (retrying): %s", error)


@contextlib.contextmanager
def hidden_in_logs(secret: str) -> Iterator[None]:
    """While active, every log record has `secret` replaced in its message and
    traceback, and httpx/httpcore (which log request URLs) only log warnings."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return _scrub(previous(*args, **kwargs), secret)

    logging.setLogRecordFactory(factory)
    quieted = [logging.getLogger(name) for name in ("httpx", "httpcore")]
    levels = [logger.level for logger in quieted]
    for logger in quieted:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(previous)
        for logger, level in zip(quieted, levels, strict=True):
            logger.setLevel(level)


def _scrub(record: logging.LogRecord, secret: str) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a bad format call: logging reports it itself
        return record
    if secret in message:
        record.msg, record.args = message.replace(secret, MASK), ()
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if secret in text:
            record.exc_text = text.replace(secret, MASK)
    return record


@contextlib.contextmanager
def _sigterm_as_interrupt(enabled: bool) -> Iterator[None]:
    """SIGTERM (systemd, docker stop) stops the bot like Ctrl-C: asyncio.run cancels
    the main task, so every platform and the engine shut down in order. Left alone when
    SIGTERM is already handled, or off the main thread."""
    usable = (
        enabled
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    )
    if usable:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        if usable and signal.getsignal(signal.SIGTERM) is _interrupt:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _interrupt(signum: int, frame: object) -> None:
    signal.raise_signal(signal.SIGINT)
