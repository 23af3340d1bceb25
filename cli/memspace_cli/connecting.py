"""How the tenant commands (`remember`, `recall`, `get`, `forget`, `watch`) find their server,
space and token: flags first, then MEMSPACE_* variables, then a mounted credentials Secret
(MEMSPACE_CREDENTIALS_DIR, else /var/run/memspace when it exists); see
`memspace_contract.client.Credentials.from_env`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memspace_contract import client


def add_arguments(command: argparse.ArgumentParser) -> None:
    """The connection and output flags every tenant command takes."""
    where = command.add_argument_group(
        "connection",
        "each defaults to MEMSPACE_ENDPOINT / MEMSPACE_SPACE / MEMSPACE_TOKEN(_FILE), else the "
        "credentials Secret mounted at MEMSPACE_CREDENTIALS_DIR or "
        f"{client.DEFAULT_CREDENTIALS_DIR}",
    )
    where.add_argument("--endpoint", metavar="HOST:PORT", help="server address")
    where.add_argument("--space", metavar="ID", help="the space (its credentials Secret's key)")
    where.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the token")
    where.add_argument(
        "--credentials-dir",
        type=Path,
        metavar="DIR",
        help="a mounted credentials Secret (files space, endpoint, token, ca.crt)",
    )
    where.add_argument("--tls", action="store_true", default=None, help="connect over TLS")
    where.add_argument("--ca-file", type=Path, metavar="FILE", help="PEM CA bundle of the server")
    where.add_argument("--server-name", metavar="NAME", help="the name in the server's certificate")
    where.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per try of a call (default 30)"
    )
    command.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="a table for people (default) or JSON for scripts",
    )


def credentials(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> client.Credentials:
    """The credentials the flags and the environment name (CredentialsError when unusable)."""
    env = dict(os.environ if environ is None else environ)
    if args.credentials_dir is not None:
        env["MEMSPACE_CREDENTIALS_DIR"] = str(args.credentials_dir)
    if args.token_file is not None:
        env["MEMSPACE_TOKEN_FILE"] = str(args.token_file)
        env.pop("MEMSPACE_TOKEN", None)
    given: dict[str, Any] = {
        "MEMSPACE_ENDPOINT": args.endpoint,
        "MEMSPACE_SPACE": args.space,
        "MEMSPACE_CA_FILE": args.ca_file,
        "MEMSPACE_SERVER_NAME": args.server_name,
        "MEMSPACE_SECURE": "true" if args.tls else None,
    }
    env.update({name: str(value) for name, value in given.items() if value is not None})
    return client.Credentials.from_env(env)
