"""Settings from flags, environment and a config file, one declaration each.

Every setting is a command-line flag ``--some-name``, an environment variable
``KAKUREMICHI_SOME_NAME`` and a key ``some-name`` (or ``some_name``) in the TOML file
given by ``--config`` / ``KAKUREMICHI_CONFIG``.  Secrets also accept
``KAKUREMICHI_SOME_NAME_FILE`` naming a file that holds the value (as Docker and
Kubernetes secrets are mounted).  Precedence: flag > env > env ``_FILE`` > file >
default.  A bad value raises :class:`ConfigError` naming the setting; the CLI turns it
into exit code 2.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "KAKUREMICHI_"


class ConfigError(Exception):
    """A setting has a value we cannot use; the message names the setting."""


@dataclass(frozen=True)
class Setting:
    """One configurable value: flag, env var and config-file key."""

    name: str
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str
    secret: bool = False
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.replace("-", "_").upper()

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


def port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be 0..65535")
    return number


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be > 0")
    return number


def positive_int(value: str) -> int:
    if not value.strip().isascii() or not value.strip().isdigit():
        raise ValueError("must be a whole number")
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


COMMON: tuple[Setting, ...] = (
    Setting("log-format", "log line format", "text", choices=("text", "json")),
    Setting(
        "log-level",
        "minimum log level",
        "info",
        choices=("debug", "info", "warning", "error"),
    ),
)


def add_settings(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """Declare the settings as flags; their help shows the env var and default."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help=f"TOML file with settings (keys as flag names; env {ENV_PREFIX}CONFIG)",
    )
    for setting in settings:
        extra = f"env {setting.env}"
        if setting.secret:
            extra += f" or {setting.env}_FILE"
        if setting.default is not None and not setting.secret:
            extra += f"; default {setting.default}"
        parser.add_argument(
            f"--{setting.name}",
            dest=setting.dest,
            default=None,
            metavar=setting.metavar or setting.name.split("-")[-1].upper(),
            help=f"{setting.help} ({extra})",
        )


def _load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from exc
    return {key.replace("_", "-"): value for key, value in data.items()}


def resolve(
    namespace: argparse.Namespace,
    settings: Sequence[Setting],
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Return ``{dest: value}`` for every setting, applying the precedence rules."""
    env = os.environ if environ is None else environ
    config_path = getattr(namespace, "config", None) or env.get(ENV_PREFIX + "CONFIG")
    from_file = _load_file(config_path) if config_path else {}
    known = {s.name for s in settings}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise ConfigError(f"config: unknown key(s) in {config_path}: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for setting in settings:
        raw: Any = getattr(namespace, setting.dest, None)
        source = f"--{setting.name}"
        if raw is None and setting.env in env:
            raw, source = env[setting.env], setting.env
        if raw is None and setting.secret and setting.env + "_FILE" in env:
            file_name = env[setting.env + "_FILE"]
            source = setting.env + "_FILE"
            try:
                raw = Path(file_name).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"{source}: cannot read {file_name}: {exc.strerror}") from exc
        if raw is None and setting.name in from_file:
            raw, source = from_file[setting.name], f"{setting.name} in {config_path}"
            if not isinstance(raw, str):
                raw = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if raw is None:
            values[setting.dest] = setting.default
            continue
        if setting.choices is not None and raw not in setting.choices:
            raise ConfigError(f"{source}: {raw!r} is not one of {', '.join(setting.choices)}")
        try:
            values[setting.dest] = setting.parse(raw)
        except (ValueError, TypeError) as exc:
            if setting.secret:  # the parser's message may quote the value
                raise ConfigError(f"{source}: invalid value") from None
            raise ConfigError(f"{source}: invalid value {raw!r}: {exc}") from exc
    return values
