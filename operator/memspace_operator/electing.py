"""Leader election on a coordination.k8s.io Lease: of the operator's replicas one leads (runs
kopf, the observers and every write), the others stand by reading the Lease, and one of them
takes over when the leader releases it or stops renewing it.

The rules (those of Kubernetes' own controllers):
- The leader renews the Lease every `retry_period_s`. When it has not renewed for
  `renew_deadline_s` (API unreachable, a conflict showing that another holds it) it steps down
  (`keep` returns; the process exits and restarts as a standby). The deadline counts from when
  the last successful renewal was *sent*, so the leader always stops before a standby's view of
  the Lease can expire.
- A standby takes the Lease when it is released (no holder) or when its record has not changed
  for `leaseDurationSeconds` by the standby's own clock, from when it saw the record change. No
  clocks are compared: the only use of the record's renewTime is to place that change between
  the standby's previous read and this one (a skewed clock moves the estimate by at most one
  retry period, within the leader's margin of duration - renew deadline). So a standby takes
  over about one lease duration after the leader's last renewal, however long it slept.
- Every write carries the resourceVersion it read: of two replicas racing for the Lease, one
  wins and the other reads again (409 Conflict).
- A leader that stops normally (SIGTERM) releases the Lease (no holder, duration 1 s): its
  standby takes over at its next read, not a lease duration later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import socket
import uuid
from typing import Any

from memspace_operator import errors, kube, naming

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Timing:
    duration_s: int
    """leaseDurationSeconds: a standby waits this long after the last change it saw."""
    renew_deadline_s: float
    """A leader that has not renewed for this long steps down (< duration_s)."""
    retry_period_s: float
    """Between renewals, and between a standby's reads (< renew_deadline_s)."""

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.duration_s:
            raise ValueError(f"need 0 < retry period < renew deadline < duration: {self}")


def identity() -> str:
    """This process's holderIdentity: the host (the pod's name in a cluster) and a random part,
    so that a restarted process never mistakes its predecessor's Lease for its own."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:10]}"


@dataclasses.dataclass(frozen=True)
class Record:
    """What a Lease says about its holder."""

    holder: str
    duration_s: int
    renew_time: str
    transitions: int

    @classmethod
    def of(cls, lease: dict[str, Any]) -> Record:
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_s=int(spec.get("leaseDurationSeconds") or 0),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
        )


class LostError(Exception):
    """The Lease is held by another replica."""


def _now() -> str:
    """MicroTime, as the Lease's acquireTime and renewTime hold it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _age_s(micro_time: str) -> float:
    """Seconds since `micro_time` by this machine's clock (0 when unreadable)."""
    try:
        then = datetime.datetime.strptime(micro_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.UTC
        )
    except ValueError:
        return 0.0
    return (datetime.datetime.now(datetime.UTC) - then).total_seconds()


class Elector:
    """One replica's side of the election on Lease `namespace/name`. `acquire` returns once
    this replica leads; `keep` renews until leadership is lost; `release` hands it over."""

    def __init__(
        self, client: kube.Kube, namespace: str, name: str, holder: str, timing: Timing
    ) -> None:
        self._kube = client
        self._url = kube.leases(namespace, name)
        self._namespace, self._name = namespace, name
        self.identity = holder
        self.timing = timing
        self.leader = ""
        """The holder the last read named (for logs and the standby's probe)."""
        self.leading = False
        self._lease: dict[str, Any] | None = None
        """The Lease as last read or written by us (its resourceVersion is the next write's)."""
        self._seen: Record | None = None
        self._seen_at = 0.0
        self._renewed_at = 0.0

    @property
    def _request_timeout_s(self) -> float:
        return self.timing.retry_period_s

    # -- standing by -------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Return once this replica holds the Lease (creating it when there is none)."""
        loop = asyncio.get_running_loop()
        previous_read: float | None = None
        announced = ""
        while True:
            try:
                lease = await self._read()
            except errors.ApiError as err:
                log.warning("cannot read Lease %s/%s: %s", self._namespace, self._name, err)
                await asyncio.sleep(self.timing.retry_period_s)
                continue
            now = loop.time()
            if lease is None:
                if await self._create():
                    return
                continue
            record = Record.of(lease)
            self.leader = record.holder
            if record != self._seen:
                # It changed after our previous read and by now; its renewTime says when.
                since = 0.0 if previous_read is None else now - previous_read
                self._seen = record
                self._seen_at = now - min(since, max(0.0, _age_s(record.renew_time)))
            previous_read = now
            expires = self._seen_at + max(record.duration_s, 1)
            if not record.holder or record.holder == self.identity or now >= expires:
                if await self._take(lease, record):
                    return
                continue
            if record.holder != announced:
                announced = record.holder
                log.info(
                    "standing by as %s: %s leads (Lease %s/%s)",
                    self.identity,
                    record.holder,
                    self._namespace,
                    self._name,
                )
            await asyncio.sleep(min(self.timing.retry_period_s, expires - now))

    async def _read(self) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await self._kube.request(
                "GET", self._url, attempt_s=self._request_timeout_s
            )
        except errors.NotFoundError:
            return None
        return found

    def _spec(self, transitions: int) -> dict[str, Any]:
        now = _now()
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.timing.duration_s,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def _create(self) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self._name,
                "namespace": self._namespace,
                "labels": {**naming.managed(), naming.COMPONENT: "operator"},
            },
            "spec": self._spec(0),
        }
        sent = asyncio.get_running_loop().time()
        try:
            self._lease = await self._kube.create(kube.leases(self._namespace), body)
        except errors.AlreadyExistsError:
            return False
        except errors.ApiError as err:
            log.warning("cannot create Lease %s/%s: %s", self._namespace, self._name, err)
            await asyncio.sleep(self.timing.retry_period_s)
            return False
        self._won(sent, "created")
        return True

    async def _take(self, lease: dict[str, Any], record: Record) -> bool:
        transitions = record.transitions + (1 if record.holder != self.identity else 0)
        body = {**lease, "spec": self._spec(transitions)}
        sent = asyncio.get_running_loop().time()
        try:
            self._lease = await self._kube.replace(
                self._url, body, attempt_s=self._request_timeout_s
            )
        except errors.ConflictError:
            return False  # another replica wrote first: read again
        except errors.ApiError as err:
            log.warning("cannot take Lease %s/%s: %s", self._namespace, self._name, err)
            await asyncio.sleep(self.timing.retry_period_s)
            return False
        self._won(sent, f"taken over from {record.holder}" if record.holder else "taken")
        return True

    def _won(self, sent: float, how: str) -> None:
        self._renewed_at = sent
        self.leading = True
        self.leader = self.identity
        log.info("leading as %s: Lease %s/%s %s", self.identity, self._namespace, self._name, how)

    # -- leading -----------------------------------------------------------------------------

    async def keep(self) -> None:
        """Renew the Lease every retry period; return once leadership is lost (not renewed
        within the renew deadline, or held by another)."""
        try:
            while True:
                await asyncio.sleep(self.timing.retry_period_s)
                deadline = self._renewed_at + self.timing.renew_deadline_s
                async with asyncio.timeout_at(deadline):
                    await self._renew()
        except TimeoutError:
            log.error(
                "Lease %s/%s not renewed for %g s: stepping down",
                self._namespace,
                self._name,
                self.timing.renew_deadline_s,
            )
        except LostError as err:
            log.error("Lease %s/%s lost: %s; stepping down", self._namespace, self._name, err)
        self.leading = False

    async def _renew(self) -> None:
        """One renewal, retried until it succeeds (the caller bounds it by the deadline)."""
        loop = asyncio.get_running_loop()
        while True:
            assert self._lease is not None
            spec = {**(self._lease.get("spec") or {}), "renewTime": _now()}
            sent = loop.time()
            try:
                self._lease = await self._kube.replace(
                    self._url, {**self._lease, "spec": spec}, attempt_s=self._request_timeout_s
                )
            except errors.ConflictError:
                await self._reread()
                continue
            except errors.ApiError as err:
                log.warning("cannot renew Lease %s/%s: %s", self._namespace, self._name, err)
                await asyncio.sleep(self.timing.retry_period_s / 4)
                continue
            self._renewed_at = sent
            return

    async def _reread(self) -> None:
        """After a conflict: still ours (someone else touched its labels, say), or lost."""
        try:
            lease = await self._read()
        except errors.ApiError as err:
            log.warning("cannot read Lease %s/%s: %s", self._namespace, self._name, err)
            await asyncio.sleep(self.timing.retry_period_s / 4)
            return
        holder = Record.of(lease).holder if lease is not None else ""
        if lease is None or holder != self.identity:
            self.leader = holder
            raise LostError(f"held by {holder or 'nobody'}" if lease else "deleted")
        self._lease = lease

    async def release(self) -> None:
        """Hand the Lease over at once (no holder, 1 s): a standby takes it at its next read."""
        if not self.leading or self._lease is None:
            return
        self.leading = False
        spec = {
            **(self._lease.get("spec") or {}),
            "holderIdentity": "",
            "leaseDurationSeconds": 1,
            "renewTime": _now(),
        }
        try:
            await self._kube.replace(
                self._url, {**self._lease, "spec": spec}, attempt_s=self._request_timeout_s
            )
        except errors.ApiError as err:
            log.warning(
                "Lease %s/%s not released (%s): a standby takes over when it expires",
                self._namespace,
                self._name,
                err,
            )
            return
        log.info("Lease %s/%s released", self._namespace, self._name)
