"""The ``kdcore`` command (also ``python -m kdcore``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kdcore import plugins


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcore", description="Knowledge distillation for PyTorch.")
    parser.add_argument("--disable-plugins", action="store_true",
                        help=f"do not load third-party plugins (the same as {plugins.DISABLE_ENV}=1)")
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                        help="skip the plugin or package NAME (repeatable; the same as "
                             f"{plugins.DISABLE_ENV}=NAME,...)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("plugins", help="list the installed plugins and what each registers",
                                  description="List every plugin kdcore found: its package and version, whether "
                                              "it is built in, and the methods, losses, backends, callbacks and "
                                              "hooks it provides. Failed and disabled plugins are listed too.")
    listing.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    listing.set_defaults(run=plugins_command)
    return parser


def plugins_command(args: argparse.Namespace) -> int:
    found = plugins.list_plugins()
    if args.json:
        print(json.dumps([info.as_dict() for info in found], indent=2))
        return 0
    for info in found:
        origin = "built-in" if info.builtin else "third-party"
        print(f"{info.name}  [{info.package_label or '-'}, {origin}]  {info.module}")
        if info.status != "loaded":
            print(f"    {info.status}" + (f": {info.error}" if info.error else ""))
        for kind, names in info.registers.items():
            print(f"    {kind}: {', '.join(names)}")
        if info.hooks:
            print(f"    hooks: {', '.join(info.hooks)}")
        for warning in info.warnings:
            print(f"    warning: {warning}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.disable_plugins:
        plugins.reload(disable=True)
    elif args.disable_plugin:
        plugins.reload(disable=",".join(args.disable_plugin))
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
