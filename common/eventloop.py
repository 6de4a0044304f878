"""The event loop a command runs on: ``--event-loop auto|uvloop|asyncio``.

``auto`` (the default) is uvloop when it can be imported (it comes with
``uvicorn[standard]`` on Linux), else asyncio's own loop; ``uvloop`` when it cannot be
imported is a configuration error.  :func:`run` is the one place a command's main
coroutine gets its loop (control, gateway, agent and demo all go through it): it
creates the loop with :class:`asyncio.Runner`, logs which loop is in use, and runs
the coroutine to completion.  No global event-loop policy is installed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from common.config import ConfigError, Setting
from common.logs import kv

T = TypeVar("T")

CHOICES = ("auto", "uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _uvloop_factory() -> LoopFactory | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def _asyncio_loop() -> asyncio.AbstractEventLoop:
    """asyncio's default loop, whatever event-loop policy is installed globally."""
    if sys.platform == "win32":  # pragma: no cover
        return asyncio.ProactorEventLoop()
    return asyncio.SelectorEventLoop()


def _checked(value: str) -> str:
    """``Setting.parse`` for ``--event-loop``: uvloop must be importable when asked for."""
    if value == "uvloop" and _uvloop_factory() is None:
        raise ValueError(
            "uvloop is not installed (pip install uvloop, or use --event-loop auto or asyncio)"
        )
    return value


EVENT_LOOP = Setting(
    "event-loop",
    "event loop: auto (uvloop when installed, else asyncio), uvloop or asyncio",
    "auto",
    parse=_checked,
    choices=CHOICES,
    metavar="LOOP",
)


def resolve(choice: str) -> str:
    """``"uvloop"`` or ``"asyncio"``: the loop ``choice`` (one of :data:`CHOICES`) means
    here.  Also the name uvicorn's ``loop`` setting takes."""
    if choice not in CHOICES:
        raise ConfigError(f"--event-loop: {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    if _uvloop_factory() is not None:
        return "uvloop"
    if choice == "uvloop":
        raise ConfigError("--event-loop: uvloop is not installed (pip install uvloop)")
    return "asyncio"


def loop_factory(choice: str) -> LoopFactory:
    """A callable that creates a new loop of the kind ``choice`` stands for."""
    if resolve(choice) == "uvloop":
        factory = _uvloop_factory()
        assert factory is not None  # resolve() checked
        return factory
    return _asyncio_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``: what ``loop`` actually is."""
    return "uvloop" if type(loop).__module__.partition(".")[0] == "uvloop" else "asyncio"


async def _announced(main: Coroutine[Any, Any, T], choice: str, logger: str) -> T:
    loop = asyncio.get_running_loop()
    logging.getLogger(logger).info("event loop", extra=kv(loop=loop_name(loop), choice=choice))
    return await main


def run(main: Coroutine[Any, Any, T], choice: str, logger: str) -> T:
    """Run ``main`` to completion on a new loop of the kind ``choice`` names (see
    :func:`resolve`), logging one ``event loop`` line to ``logger`` first."""
    try:
        factory = loop_factory(choice)
    except BaseException:
        main.close()  # never started: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_announced(main, choice, logger))
