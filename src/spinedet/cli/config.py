"""``spinedet config show``: the resolved training config, every key."""

from __future__ import annotations

import argparse

__all__ = ["add_config_commands"]


def _show(args: argparse.Namespace) -> int:
    import yaml

    from ..config import load_config

    print(yaml.safe_dump(load_config(args.config, args.set), sort_keys=False), end="")
    return 0


def add_config_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the resolved config of a recipe or file")
    commands = p.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    show = commands.add_parser("show", help="print the config with defaults and --set applied")
    show.add_argument("config", help="config file or shipped recipe name (e.g. quickstart)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.epochs=12")  # fmt: skip
    show.set_defaults(func=_show)
