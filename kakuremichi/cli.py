"""The ``kakuremichi`` command: one script, a verb per program.

    kakuremichi control            run the management server
    kakuremichi admin …            manage agents, gateways, tunnels through the REST API
    kakuremichi gateway            run a gateway (the public edge)
    kakuremichi agent              run an agent (the rootless connector)
    kakuremichi demo               all of it on loopback, rootless, with a sample app
    kakuremichi apply -f FILE      make Control match a kakuremichi.yaml (tunnels as code)
    kakuremichi export             write Control's state in that format

Exit codes: 0 clean shutdown, 2 bad configuration (the message names the setting),
1 anything else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from common import __version__
from common.config import ConfigError

# (verb, one-line help, module path of a function register(subparsers) -> None)
_VERBS: tuple[tuple[str, str], ...] = (
    ("control", "control.main"),
    ("admin", "control.admin"),
    ("gateway", "gateway.main"),
    ("agent", "agent.main"),
    ("demo", "kakuremichi.demo"),
    ("apply", "kakuremichi.apply"),  # also registers export
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kakuremichi",
        description=(
            "Self-hosted tunneled reverse proxy: publish a service on a private machine "
            "at a public hostname over WireGuard, without opening an inbound port."
        ),
        epilog=(
            "Every flag also reads KAKUREMICHI_<FLAG> from the environment (dashes -> "
            "underscores, upper case) and a key in the --config TOML file; secrets also "
            "read KAKUREMICHI_<FLAG>_FILE. Run 'kakuremichi VERB --help' for a verb's flags."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kakuremichi {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for _verb, module_name in _VERBS:
        module = __import__(module_name, fromlist=["register"])
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return run(args)
    except ConfigError as exc:
        print(f"kakuremichi {args.verb}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
