"""Entry point of the `memspace` console script: one subcommand per part of the product."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from memspace_cli import serve


def _operator(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module("memspace_operator.main")
    except ModuleNotFoundError as err:
        if err.name is not None and not err.name.startswith("memspace_operator"):
            raise
        print(
            "memspace operator: the operator is not installed in this environment "
            "(package memspace_operator); install memspace with the operator, or run the "
            "memspace image",
            file=sys.stderr,
        )
        return 2
    code = module.main(args.operator_args)
    return int(code or 0)


def parser(only_serve: bool = False) -> argparse.ArgumentParser:
    """Every command's parser; `only_serve`: `serve`'s alone (the other commands import the
    client library, numpy and the generated code among it, which a starting server imports
    only once its health port is open, see `serve`)."""
    top = argparse.ArgumentParser(
        prog="memspace",
        description="Kubernetes-native, multi-tenant memory spaces for AI agents.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(commands)
    if only_serve:
        return top
    from memspace_cli import backup, memories, status  # noqa: PLC0415  # see only_serve

    status.add_parser(commands)
    backup.add_parser(commands)
    memories.add_parsers(commands)
    operator = commands.add_parser(
        "operator",
        help="run the Kubernetes operator",
        description="Run the memspace operator (arguments are passed to it).",
    )
    operator.add_argument("operator_args", nargs=argparse.REMAINDER, metavar="ARGS")
    operator.set_defaults(run=_operator)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["operator"]:
        # The operator parses its own options: argparse's REMAINDER refuses a first "--option".
        return _operator(argparse.Namespace(operator_args=arguments[1:]))
    args = parser(only_serve=arguments[:1] == ["serve"]).parse_args(arguments)
    code: int = args.run(args)
    if args.command == "backup":
        # The command's work is done and printed. Skip the interpreter's teardown: obstore's
        # shared Tokio runtime is never shut down, its worker threads run on into Py_Finalize,
        # and one that touches interpreter state already torn down panics on a thread with no
        # Python frame to catch it, so Rust aborts the process (SIGABRT, nothing on stderr).
        # It happened once after a delete had finished, failing a command that had succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
