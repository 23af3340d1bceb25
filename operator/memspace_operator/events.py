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
PRUNE_AT = 10_000
"""Posts remembered before the first pruning of those older than `REPEAT_S`."""
EventType = Literal["Normal", "Warning"]


class Recorder:
    def __init__(self, repeat_s: float = REPEAT_S) -> None:
        self.repeat_s = repeat_s
        self._posted: dict[str, dict[tuple[str, str], float]] = {}
        """When each (reason, message) was last posted, per object uid."""
        self._count = 0
        self._prune_at = PRUNE_AT
        self._poster: contextvars.Context | None = None
        """A context of one of kopf's handlers, which holds kopf's event queue: observers
        running outside the handlers (the shard pods' watch) post through it."""

    def normal(self, ref: models.SpaceRef, reason: str, message: str) -> None:
        self.post(ref, "Normal", reason, message)

    def warning(self, ref: models.SpaceRef, reason: str, message: str) -> None:
        self.post(ref, "Warning", reason, message)

    def post(self, ref: models.SpaceRef, type_: EventType, reason: str, message: str) -> None:
        key = (reason, message)
        now = time.monotonic()
        posted = self._posted.setdefault(ref.uid, {})
        if now - posted.get(key, -self.repeat_s) < self.repeat_s:
            return
        self._count += key not in posted
        posted[key] = now
        if self._count > self._prune_at:
            self._prune(now)
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
        self._count -= len(self._posted.pop(ref.uid, {}))

    def _prune(self, now: float) -> None:
        """Forget the posts older than `repeat_s`. Done again only once the count doubled: a
        rebuild at every post past a fixed size was quadratic (10,000 spaces post three events
        each within the repeat window)."""
        kept = {
            uid: fresh
            for uid, posts in self._posted.items()
            if (fresh := {k: t for k, t in posts.items() if now - t < self.repeat_s})
        }
        self._posted = kept
        self._count = sum(len(posts) for posts in kept.values())
        self._prune_at = max(PRUNE_AT, 2 * self._count)
