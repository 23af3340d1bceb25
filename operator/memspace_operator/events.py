"""Kubernetes Events about MemorySpaces, posted through kopf's event poster (queued, retried
with backoff, reported as component memspace-operator).

The same event for the same object is posted once per `REPEAT_S`, so a failure retried every
few seconds, or a periodic re-check, does not flood the namespace with copies.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Literal, cast

import kopf

from memspace_operator import models

log = logging.getLogger(__name__)

REPEAT_S = 600.0
EventType = Literal["Normal", "Warning"]


class Recorder:
    def __init__(self, repeat_s: float = REPEAT_S) -> None:
        self.repeat_s = repeat_s
        self._posted: dict[tuple[str, str, str], float] = {}
        self._poster: contextvars.Context | None = None
        """A context of one of kopf's handlers, which holds kopf's event queue: observers
        running outside the handlers (the shard pods' watch) post through it."""

    def normal(self, ref: models.SpaceRef, reason: str, message: str) -> None:
        self.post(ref, "Normal", reason, message)

    def warning(self, ref: models.SpaceRef, reason: str, message: str) -> None:
        self.post(ref, "Warning", reason, message)

    def post(self, ref: models.SpaceRef, type_: EventType, reason: str, message: str) -> None:
        key = (ref.uid, reason, message)
        now = time.monotonic()
        if now - self._posted.get(key, -self.repeat_s) < self.repeat_s:
            return
        self._posted[key] = now
        if len(self._posted) > 10_000:
            self._posted = {k: t for k, t in self._posted.items() if now - t < self.repeat_s}
        log.log(
            logging.INFO if type_ == "Normal" else logging.WARNING,
            "%s %s: %s",
            ref,
            reason,
            message,
        )
        target = kopf.Body(cast("kopf.RawBody", ref.event_target()))
        try:
            kopf.event(target, type=type_, reason=reason, message=message[:1024])
        except LookupError:
            # Outside kopf's handlers: through a handler's context when one was seen, else the
            # log line above is all.
            if self._poster is not None:
                with contextlib.suppress(LookupError, RuntimeError):
                    self._poster.run(
                        kopf.event, target, type=type_, reason=reason, message=message[:1024]
                    )
        else:
            if self._poster is None:
                self._poster = contextvars.copy_context()

    def forget(self, ref: models.SpaceRef) -> None:
        self._posted = {k: t for k, t in self._posted.items() if k[0] != ref.uid}
