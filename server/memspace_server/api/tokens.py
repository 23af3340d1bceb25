"""Secrets read from files that may be rotated underneath the process (a Kubernetes Secret
volume, a file an admin rewrites): re-read when their size or modification time changes."""

from __future__ import annotations

import hmac
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class TokenFileError(ValueError):
    """The token file cannot be read or is empty; the message names the file."""


class TokenFile:
    """A bearer token kept in a file. `current()` re-reads the file when it changed; a file that
    became unreadable or empty keeps the last good token (a half-written rotation must not lock
    everyone out), with a warning. Safe to call from any thread."""

    def __init__(self, path: Path, required: bool = True) -> None:
        """`required=False`: a missing or empty file at start is no error; nothing is admitted
        until it holds a token (a server under the operator mounts it from an optional Secret)."""
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._token = ""
        self._warned: str | None = None
        self._load(required=required)

    def _load(self, required: bool) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            token = self.path.read_text().strip()
        except OSError as err:
            if required:
                raise TokenFileError(f"cannot read the token file {self.path}: {err}") from err
            self._warn(f"cannot read the token file {self.path}: {err}")
            return
        if not token:
            if required:
                raise TokenFileError(f"the token file {self.path} is empty")
            self._warn(f"the token file {self.path} is empty")
            return
        if self._stamp is not None or self._warned is not None:
            log.info("token loaded from %s", self.path)
        self._warned = None
        self._stamp = stamp
        self._token = token

    def _warn(self, problem: str) -> None:
        """Once per problem: the file is re-read on every use."""
        if problem != self._warned:
            self._warned = problem
            kept = "keeping the previous token" if self._token else "admitting nobody until then"
            log.warning("%s; %s", problem, kept)

    def current(self) -> str:
        with self._lock:
            self._load(required=False)
            return self._token

    def admits(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries this token (constant-time compare)."""
        scheme, _, presented = (authorization or "").partition(" ")
        token = self.current()
        if scheme.lower() != "bearer" or not token:
            return False
        return hmac.compare_digest(presented.strip().encode(), token.encode())
