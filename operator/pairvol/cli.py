"""`pairvol` command line: one entry point, several roles.

Each sub-command lives in its own sub-package and registers itself through a
``register(subparsers)`` function; modules are imported lazily so that, e.g., the agent
does not import kopf.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

# sub-command name -> module that provides register(subparsers) and run(args) -> int
COMMANDS: dict[str, str] = {
    "agent": "pairvol.agent.cli",
    "operator": "pairvol.operator.cli",
    "localcluster": "pairvol.localcluster.cli",
    "demo": "pairvol.localcluster.demo",
    "demo-agent": "pairvol.agent.demo",
    "csi": "pairvol.csi.cli",
}


# third-party module -> the pip extra that installs it (`pip install 'pairvol[EXTRA]'`)
OPTIONAL_MODULES: dict[str, str] = {"kmock": "localcluster"}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """What to install when ``exc`` is an optional dependency missing, else None."""
    root = (exc.name or "").split(".")[0]
    extra = OPTIONAL_MODULES.get(root)
    if extra is None:
        return None
    return (
        f"this command needs the Python package {root!r}, which the plain install leaves out: "
        f"install it with: pip install 'pairvol[{extra}]'"
    )


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr that points at --help, exit status 2 (sub-command
    parsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = Parser(prog="pairvol", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, module in COMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name, help=f"see 'pairvol {name} --help'")
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("pairvol"):
                continue  # that part of pairvol is not installed in this build
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(args_list).parse_args(args_list)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc)
        if hint is None:
            raise
        print(f"pairvol: {hint}", file=sys.stderr)
        return 1
