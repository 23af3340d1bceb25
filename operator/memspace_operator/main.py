"""`memspace operator`: run the operator until SIGTERM or SIGINT.

The CLI calls `main(argv)` with the arguments after `memspace operator`. Settings come from the
environment (MEMSPACE_*, see settings.py); credentials in cluster from the pod's
ServiceAccount, out of cluster from $KUBECONFIG or ~/.kube/config.

With leader election on (the default), the process first stands by until it holds the Lease
(see electing.py), answering the liveness endpoint meanwhile; then it runs kopf. A leader that
loses the Lease stops kopf and exits with status 1 (its Deployment restarts it as a standby);
one stopped by a signal releases the Lease so that a standby takes over at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp.web
import kopf

from memspace_operator import electing, kube
from memspace_operator.settings import Settings, SettingsError

log = logging.getLogger(__name__)


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

    with contextlib.suppress(asyncio.CancelledError):
        return asyncio.run(operate(args, settings))
    return 0


async def operate(args: argparse.Namespace, settings: Settings) -> int:
    """Run kopf once this process leads (at once without leader election); the exit status."""
    options: dict[str, Any] = {
        "standalone": True,  # kopf's own peering is off: the Lease decides who runs
        "clusterwide": not args.namespace,
        "namespaces": args.namespace,
        "liveness_endpoint": args.liveness,
        "memo": kopf.Memo(settings=settings),
    }
    if not settings.leader_election:
        await kopf.operator(**options)
        return 0
    timing = electing.Timing(
        settings.lease_duration_s, settings.lease_renew_deadline_s, settings.lease_retry_period_s
    )
    # A client of its own: renewals never queue behind the operator's requests.
    client = await kube.Kube.open(concurrency=2)
    elector = electing.Elector(
        client, settings.server_namespace, settings.lease_name, electing.identity(), timing
    )
    try:
        async with _standby_probe(args.liveness, elector):
            if not await _until_leading(elector):
                return 0
        # Created before kopf starts, so kopf's shutdown leaves it alone.
        keeper = asyncio.create_task(elector.keep(), name="memspace-lease")
        stop = asyncio.Event()
        running = asyncio.create_task(kopf.operator(**options, stop_flag=stop), name="kopf")
        try:
            await asyncio.wait({keeper, running}, return_when=asyncio.FIRST_COMPLETED)
            if not running.done():  # the Lease is lost: stop before a standby takes over
                stop.set()
                grace = max(1.0, timing.duration_s - timing.renew_deadline_s - 1.0)
                try:
                    await asyncio.wait_for(asyncio.shield(running), grace)
                except TimeoutError:
                    log.critical("kopf did not stop within %g s of losing the Lease", grace)
                    logging.shutdown()
                    os._exit(1)  # never two leaders: exit now, whatever is in flight
                return 1
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            await elector.release()
        running.result()  # kopf's own failure, if any, re-raised
        return 0
    finally:
        await client.close()


async def _until_leading(elector: electing.Elector) -> bool:
    """Stand by until this process leads (True) or SIGTERM/SIGINT arrives (False)."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for number in signals:
        loop.add_signal_handler(number, stopped.set)
    acquiring = asyncio.create_task(elector.acquire(), name="memspace-election")
    waiting = asyncio.create_task(stopped.wait())
    try:
        await asyncio.wait({acquiring, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for number in signals:
            loop.remove_signal_handler(number)
        for task in (acquiring, waiting):
            task.cancel()
        await asyncio.gather(acquiring, waiting, return_exceptions=True)
    if elector.leading and stopped.is_set():
        await elector.release()
        return False
    return elector.leading


@contextlib.asynccontextmanager
async def _standby_probe(endpoint: str | None, elector: electing.Elector) -> AsyncIterator[None]:
    """Answer the liveness URL while standing by (kopf answers it once this process leads):
    a standby is alive and ready, and its Deployment counts it toward the disruption budget."""
    if not endpoint:
        yield
        return
    url = urllib.parse.urlsplit(endpoint)

    async def healthz(_: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"role": "standby", "leader": elector.leader})

    app = aiohttp.web.Application()
    app.router.add_get(url.path or "/", healthz)
    runner = aiohttp.web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = aiohttp.web.TCPSite(runner, url.hostname, url.port or 80, reuse_address=True)
        await site.start()
        yield
    finally:
        await runner.cleanup()


run = main
"""The same entry point under the name the operator issue uses."""


if __name__ == "__main__":
    sys.exit(main())
