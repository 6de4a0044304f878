"""Fixtures shared by every test package: a real Control on loopback (``control``) and
an authenticated REST client for it (``api``).

The event loop of the async tests: ``KAKUREMICHI_TEST_EVENT_LOOP=uvloop`` (or
``asyncio``) runs every pytest-asyncio test and fixture on that loop, made by the same
factory as ``--event-loop`` (``common.eventloop``), through pytest-asyncio's
``pytest_asyncio_loop_factories`` hook (1.4+; test ids stay the same).  Unset,
pytest-asyncio's default loop is used.  uvloop asked for but not importable is an
error under ``CI=true`` and skips the async tests elsewhere, like ``need()``.  Loops a
test creates itself (``asyncio.run`` in a sync test, a thread's own loop) are not
affected.
"""

from __future__ import annotations

import os

import pytest
import pytest_asyncio
from pytest_asyncio.plugin import PytestAsyncioSpecs

from common import eventloop
from tests.controlserver import api, control
from tests.images import images
from tests.support import IN_CI

__all__ = ["api", "control", "images"]

TEST_EVENT_LOOP_ENV = "KAKUREMICHI_TEST_EVENT_LOOP"
_requested = os.environ.get(TEST_EVENT_LOOP_ENV, "").strip()
_problem: str | None = None  # why the requested loop cannot be used
_factory: eventloop.LoopFactory | None = None
if _requested not in ("", "uvloop", "asyncio"):
    _problem = f"{TEST_EVENT_LOOP_ENV}={_requested!r}: use uvloop or asyncio"
elif _requested == "uvloop" and eventloop.resolve("auto") != "uvloop":
    _problem = f"{TEST_EVENT_LOOP_ENV}=uvloop but uvloop is not importable"
elif _requested:
    _factory = eventloop.loop_factory(_requested)


def pytest_configure(config: pytest.Config) -> None:
    if not _requested:
        return
    if not hasattr(PytestAsyncioSpecs, "pytest_asyncio_loop_factories"):
        raise pytest.UsageError(
            f"{TEST_EVENT_LOOP_ENV} needs pytest-asyncio >= 1.4 (pytest_asyncio_loop_factories)"
        )
    if _problem is not None and (IN_CI or _requested != "uvloop"):
        raise pytest.UsageError(_problem + (" (CI=true: no fallback)" if IN_CI else ""))


def pytest_report_header(config: pytest.Config) -> str | None:
    if not _requested:
        return None
    if _problem is not None:
        return f"event loop: {_problem}; async tests skipped"
    return f"event loop: {_requested} ({TEST_EVENT_LOOP_ENV})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The tests on container images last: their build (tests/images.py) may still be
    # running in the background (scripts/test.sh); the order within them is kept.
    later = [item for item in items if "images" in getattr(item, "fixturenames", ())]
    if later:
        moved = set(map(id, later))
        items[:] = [item for item in items if id(item) not in moved] + later
    if _problem is None:
        return
    skip = pytest.mark.skip(reason=_problem)
    for item in items:
        if pytest_asyncio.is_async_test(item):
            item.add_marker(skip)


if _factory is not None:

    @pytest.hookimpl(optionalhook=True)
    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, eventloop.LoopFactory]:
        assert _factory is not None
        return {_requested: _factory}
