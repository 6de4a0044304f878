"""Fixtures shared by every test package: a real Control on loopback (``control``) and
an authenticated REST client for it (``api``)."""

from tests.controlserver import api, control

__all__ = ["api", "control"]
