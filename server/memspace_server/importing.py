"""Heavy libraries imported on first use, not at the server's start.

A shard restarting serves again as soon as its ports are up, and every import on the way is
time with no server: zarr (a tier with committed rows), faiss (a large scan, an ANN graph),
tantivy (a keyword index) and a model's tokenizer are needed only once a space that uses them
is loaded. `lazy("faiss")` stands for the module and imports it on the first attribute read
(Python's import lock makes concurrent first reads import it once); `warm_up` imports them all
in a background thread once the server serves, so the first call rarely waits for one.
Must not import any of them itself.
"""

from __future__ import annotations

import gc
import importlib
import logging
import threading
import time
import types
from typing import Any, Final

log = logging.getLogger(__name__)
# faiss's loader logs at INFO which CPU build it tried and loaded, once per process: noise in a
# server's log (imported before logging was configured, as before these imports were deferred,
# those lines never showed).
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

DEFERRED: Final = ("faiss", "zarr", "zarr.codecs", "zarr.core.sync", "tantivy")
"""What `warm_up` imports: every module a loaded space may need that the start does not."""


class Lazy:
    """A module imported on the first read of one of its attributes. Each attribute read is
    kept on the proxy, so later reads are plain attribute reads (a miss that falls through to
    `__getattr__` cost about a microsecond each, several per small write): only for modules
    whose attributes are not rebound after their import, as with compiled libraries."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: types.ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        value = getattr(module, attribute)
        setattr(self, attribute, value)
        return value

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r}, {state}>"


def lazy(name: str) -> Any:
    """The module `name`, imported on first use. Annotate it with the real module for the type
    checker: ``if TYPE_CHECKING: import faiss`` / ``else: faiss = importing.lazy("faiss")``."""
    return Lazy(name)


def warm_up(names: tuple[str, ...] = DEFERRED) -> threading.Thread:
    """Import `names` in a daemon thread (started here); a call that needs one meanwhile waits
    only for what is left of its import. Then every object made so far leaves the
    cyclic collector's view for good (`gc.freeze`): the modules, classes and functions of the
    imports are most of what a full collection walks (about 60,000 objects, 40 ms with every
    thread stopped, at each full collection), and they live as long as the process."""

    def run() -> None:
        started = time.monotonic()
        for name in names:
            try:
                importlib.import_module(name)
            except Exception:  # the call that needs it reports the error where it is handled
                log.warning("importing %s in the background failed", name, exc_info=True)
        gc.freeze()
        log.debug(
            "deferred imports done in %.2f s; %d objects frozen",
            time.monotonic() - started,
            gc.get_freeze_count(),
        )

    thread = threading.Thread(target=run, name="memspace-imports", daemon=True)
    thread.start()
    return thread
