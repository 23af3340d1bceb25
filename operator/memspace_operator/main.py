"""`memspace operator`: run the operator until SIGTERM or SIGINT.

The CLI calls `main(argv)` with the arguments after `memspace operator`. Settings come from the
environment (MEMSPACE_*, see settings.py); credentials in cluster from the pod's
ServiceAccount, out of cluster from $KUBECONFIG or ~/.kube/config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import kopf

from memspace_operator.settings import Settings, SettingsError


def parser() -> argparse.ArgumentParser:
    command = argparse.ArgumentParser(
        prog="memspace operator",
        description=(
            "Reconcile MemorySpace resources into volumes, credentials, index entries and "
            "server shards. Settings come from MEMSPACE_* environment variables "
            "(docs/operator.md)."
        ),
    )
    command.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="watch MemorySpaces in this namespace only (repeatable); default: every namespace",
    )
    command.add_argument(
        "--liveness",
        metavar="URL",
        default=None,
        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz",
    )
    command.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("MEMSPACE_LOG_FORMAT", "text"),
        help="'text' for a terminal, 'json' for containers (env MEMSPACE_LOG_FORMAT)",
    )
    command.add_argument("--verbose", "-v", action="store_true", help="log debug messages")
    return command


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["--"]:  # `memspace operator -- --namespace x`
        given = given[1:]
    args = parser().parse_args(given)
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as err:
        print(f"memspace operator: {err}", file=sys.stderr)
        return 2
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    logging.getLogger("memspace_operator").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # Registers the handlers with kopf's global registry.
    from memspace_operator import handlers  # noqa: F401, PLC0415

    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(settings=settings),
    )
    return 0


run = main
"""The same entry point under the name the operator issue uses."""


if __name__ == "__main__":
    sys.exit(main())
