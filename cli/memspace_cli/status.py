"""`memspace status`: the Health RPC of a server as a table or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIERS = ("hot", "warm", "cold")
COLUMNS = (
    "SPACE",
    "STATE",
    "MEMORIES",
    "HOT",
    "WARM",
    "COLD",
    "PRESSURE",
    "WAL-LAG",
    "CONS-RATE",
    "DISK",
)


def add_parser(commands: Any) -> None:
    command = commands.add_parser(
        "status",
        help="show the health of a server's spaces",
        description=(
            "Call the Health RPC of a memspace server. Without --space it needs the admin "
            "token (every space); with --space, that space's token or the admin token."
        ),
    )
    command.add_argument(
        "--endpoint",
        default=None,
        metavar="HOST:PORT",
        help="server address (default: MEMSPACE_ENDPOINT, else 127.0.0.1:50051)",
    )
    command.add_argument("--space", default=None, metavar="ID", help="one space (default: all)")
    command.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="output format"
    )
    command.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file holding the token (default: MEMSPACE_TOKEN / MEMSPACE_TOKEN_FILE, else "
        "MEMSPACE_ADMIN_TOKEN_FILE)",
    )
    command.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    tls = command.add_argument_group(
        "TLS", "a server started with --tls-cert-file needs --tls (or a CA file)"
    )
    tls.add_argument(
        "--tls",
        action="store_true",
        default=None,
        help="connect over TLS (default: MEMSPACE_SECURE, or on when a CA file is given)",
    )
    tls.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM CA bundle the server's certificate must chain to (default: MEMSPACE_CA_FILE, "
        "else the system's roots)",
    )
    tls.add_argument(
        "--cert-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM client certificate, for a server that requires one (MEMSPACE_CERT_FILE)",
    )
    tls.add_argument(
        "--key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM key of --cert-file (MEMSPACE_KEY_FILE)",
    )
    tls.add_argument(
        "--server-name",
        default=None,
        metavar="NAME",
        help="name the server's certificate must carry when the endpoint's host is another "
        "(e.g. 127.0.0.1 through a port-forward); MEMSPACE_SERVER_NAME",
    )
    command.set_defaults(run=run)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    raise AssertionError("unreachable")


_NAMES = {
    "memories": "memories",
    "tierMemories": "tier_memories",
    "pressure": "pressure",
    "walLagMs": "wal_lag_ms",
    "consolidationRate": "consolidation_rate",
}


def _known(unknown: set[str], **figures: Any) -> dict[str, Any]:
    return {key: None if _NAMES[key] in unknown else value for key, value in figures.items()}


def duration(ms: float) -> str:
    """A lag for people: 850ms, 12.4s, 3m07s, 2h05m."""
    if ms < 1000:
        return f"{ms:.0f}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, second = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{second:02d}s"
    hours, minute = divmod(minutes, 60)
    return f"{hours}h{minute:02d}m"


def _shown(value: Any, form: str) -> str:
    return "?" if value is None else format(value, form)


def table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [COLUMNS]
    for row in rows:
        tiers = row["tierMemories"]
        cells.append(
            (
                row["space"],
                row["state"],
                _shown(row["memories"], "d"),
                *(_shown(None if tiers is None else tiers.get(t, 0), "d") for t in TIERS),
                _shown(row["pressure"], ".2f"),
                "?" if row["walLagMs"] is None else duration(row["walLagMs"]),
                _shown(row["consolidationRate"], ".1f")
                + ("" if row["consolidationRate"] is None else "/s"),
                _size(row["diskBytes"]),
            )
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


async def fetch(args: argparse.Namespace) -> dict[str, Any]:

    from memspace_contract import client  # noqa: PLC0415
    from memspace_contract.v1 import memspace_pb2 as pb  # noqa: PLC0415

    env = dict(os.environ)
    if args.token_file is not None:
        env["MEMSPACE_TOKEN_FILE"] = str(args.token_file)
        env.pop("MEMSPACE_TOKEN", None)
    elif not env.get("MEMSPACE_TOKEN") and not env.get("MEMSPACE_TOKEN_FILE"):
        admin = env.get("MEMSPACE_ADMIN_TOKEN_FILE")
        if admin:
            env["MEMSPACE_TOKEN_FILE"] = admin
    if args.endpoint:
        env["MEMSPACE_ENDPOINT"] = args.endpoint
    if args.tls:
        env["MEMSPACE_SECURE"] = "true"
    given = {
        "MEMSPACE_CA_FILE": args.ca_file,
        "MEMSPACE_CERT_FILE": args.cert_file,
        "MEMSPACE_KEY_FILE": args.key_file,
        "MEMSPACE_SERVER_NAME": args.server_name,
    }
    env.update({name: str(value) for name, value in given.items() if value is not None})
    env.pop("MEMSPACE_SPACE", None)  # the space is named below, or none: every space
    credentials = client.Credentials.from_env(env)
    async with client.connect(credentials) as memspace:
        response = await memspace.spaces.Health(
            pb.HealthRequest(space=args.space or ""), timeout=args.timeout
        )
    return {
        "status": response.status,
        "spaces": [
            {
                "space": h.space,
                "state": h.state,
                # A figure the server does not know (Health's `unknown`) is null, never 0.
                **_known(
                    set(h.unknown),
                    memories=h.memories,
                    tierMemories={tier: h.tier_memories.get(tier, 0) for tier in TIERS},
                    pressure=h.pressure,
                    walLagMs=h.wal_lag_ms,
                    consolidationRate=h.consolidation_rate,
                ),
                "diskBytes": h.disk_bytes,
            }
            for h in response.spaces
        ],
    }


def run(args: argparse.Namespace) -> int:
    import grpc  # noqa: PLC0415

    try:
        doc = asyncio.run(fetch(args))
    except grpc.aio.AioRpcError as err:
        print(f"memspace status: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except ValueError as err:  # bad credentials or space ID
        print(f"memspace status: {err}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(f"server: {doc.get('status', '')}")
        print(table(doc["spaces"]))
    return 0
