"""`memspace serve`: run the gRPC server until SIGTERM, then drain."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from memspace_contract import spaces

if TYPE_CHECKING:
    from memspace_server.api.serving import Server
    from memspace_server.settings import ServerSettings


def add_parser(commands: Any) -> None:
    try:
        from memspace_server import settings  # noqa: PLC0415  # the server loads lazily
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("memspace_server"):
            raise
        _add_absent_parser(commands)
        return

    command = commands.add_parser(
        "serve",
        help="run the memspace gRPC server",
        description=(
            "Serve memory spaces over gRPC. Standalone (no --index-dir): an index of its own "
            "under --data-root, a 'default' space, CreateSpace/DeleteSpace allowed. Managed "
            "(--index-dir): spaces come from the operator's index files."
        ),
    )
    settings.add_arguments(command)
    command.set_defaults(run=run)


def _add_absent_parser(commands: Any) -> None:
    """`memspace serve` where only the light client (memspace-client) is installed."""
    command = commands.add_parser("serve", help="run the memspace gRPC server (not installed)")
    command.add_argument("serve_args", nargs=argparse.REMAINDER, metavar="ARGS")
    command.set_defaults(run=_absent)


def _absent(args: argparse.Namespace) -> int:
    print(
        "memspace serve: the server is not installed in this environment (package "
        "memspace_server); install the memspace distribution, or run the memspace image",
        file=sys.stderr,
    )
    return 2


BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def limit_blas_threads(environ: MutableMapping[str, str] = os.environ) -> None:
    """One BLAS thread per scan unless the environment says otherwise. The server runs many
    scans at once in its worker threads; BLAS threads on top of them oversubscribe the cores
    (a 2,000 x 384 recall measured 10x slower with OpenBLAS' default threads on 2 cores). Must
    run before numpy is imported."""
    for name in BLAS_THREADS:
        environ.setdefault(name, "1")


def run(args: argparse.Namespace) -> int:
    limit_blas_threads()
    from memspace_server import settings  # noqa: PLC0415
    from memspace_server.api import logs, loops  # noqa: PLC0415

    try:
        loaded = settings.load(vars(args), os.environ)
    except settings.SettingsError as err:
        print(f"memspace serve: {err}", file=sys.stderr)
        return 2
    logs.configure(loaded.log_level, loaded.log_format)
    from memspace_server import errors  # noqa: PLC0415

    try:
        code = loops.run(loaded.event_loop, _serve(loaded))
    except (settings.SettingsError, errors.DataRootInUseError) as err:
        logging.getLogger("memspace.serve").error("%s", err)
        return 2
    # Exit now, skipping the interpreter's teardown: the drain flushed every space (or, when it
    # timed out, the WAL holds every acknowledged write while a flush may still run in a worker
    # thread), and tracing was shut down. Tearing down the modules took 1-2.5 s on a busy
    # machine, which a restarting shard's successor waits for (a StatefulSet pod keeps its name).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _serve(loaded: ServerSettings) -> int:
    """Serve: the health-only port first (a probe then waits for the server rather than failing
    and trying again a period later), the server's modules imported in a worker thread meanwhile
    (the event loop answers the probes), then the server; the libraries only a loaded space
    needs are imported in the background once it serves."""
    from memspace_server import importing  # noqa: PLC0415
    from memspace_server.settings import SettingsError  # noqa: PLC0415

    early = None
    if loaded.health_listen != "off":
        from memspace_server.api import probing  # noqa: PLC0415

        early = probing.HealthPort(loaded.health_listen)
        try:
            await early.start()
        except RuntimeError as err:
            raise SettingsError(f"cannot serve health on {loaded.health_listen}: {err}") from err
    try:
        serving = await asyncio.to_thread(importlib.import_module, "memspace_server.api.serving")

        def started(server: Server) -> None:
            importing.warm_up()
            banner(server)

        code: int = await serving.serve(loaded, on_started=started, health_port=early)
    finally:
        if early is not None:
            await early.stop(0)  # stopped already by a drain; at once after a failed start
    return code


def banner(server: Server) -> None:
    """How to call a standalone server, printed once it serves."""
    if server.settings.managed:
        return
    address = server.address
    entry = server.registry.entries().get(spaces.DEFAULT_SPACE)
    dim, model = server.settings.default_embedding
    if entry is not None:
        dim, model = entry.embedding_dim, entry.embedding
    auth = ""
    if server.router.check_tokens:
        auth = ' -H "authorization: Bearer $(cat ADMIN_TOKEN_FILE)"'
    settings = server.settings
    grpcurl, status, python = "-plaintext", "", ""
    if settings.tls:
        grpcurl, status = "-cacert CA_FILE", " --tls --ca-file CA_FILE"
        python = ", secure=True, ca_file='CA_FILE'"
    if settings.tls_client_ca_file is not None:
        grpcurl += " -cert CERT_FILE -key KEY_FILE"
        status += " --cert-file CERT_FILE --key-file KEY_FILE"
        python += ", cert_file='CERT_FILE', key_file='KEY_FILE'"
    described = f"embedding_dim {dim}" + (f", model {model.model}" if model is not None else "")
    lines = [
        f"memspace: serving on {address}, data in {settings.data_root}",
        f"  the 'default' space ({described}) answers requests that name no space",
        f"  health:   memspace status --endpoint {address}{status}",
    ]
    if model is not None:
        token = " --token-file ADMIN_TOKEN_FILE" if server.router.check_tokens else ""
        where = f"--endpoint {address}{token}{status}"
        lines += [
            f"  text:     memspace remember {where} 'the invoice is due on Friday'",
            f"            memspace recall {where} --query 'when is the bill due?' --mode hybrid",
        ]
    lines += [
        f"  grpcurl:  grpcurl {grpcurl}{auth} {address} list",
        f"            grpcurl {grpcurl}{auth} {address} memspace.v1.SpaceService/ListSpaces",
        "  python:   from memspace_contract import client",
        f"            credentials = client.Credentials(endpoint={address!r}{python})",
        "            async with client.connect(credentials) as m:",
        f"                await m.remember('hello', [1.0] * {dim})",
        f"                print(await m.recall([1.0] * {dim}, k=3))",
        "  stop:     Ctrl-C (drains: in-flight calls finish, WAL and tiers are flushed)",
    ]
    print("\n".join(lines), flush=True)
