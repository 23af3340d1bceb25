"""Memory pages faulted in ahead of use, off the caller's thread.

Growing columns (the hot tier's embedding blocks) are allocated zeroed and lazily: the first
write to each 4 KiB page traps into the kernel, which finds and zeroes a page. On the virtual
machines memspace was measured on, memory the guest has not used recently comes from the host
at that moment: writing 300 KB of embeddings into fresh pages took 350-530 µs against 50 µs
into pages already there, more than the rest of a Remember of 100 memories. `ahead` asks the
kernel to populate the pages of a range (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14+, which
leaves their contents as they are, so writers may use the range meanwhile) in one background
thread, without the GIL; the writer then finds its pages there. Where the call is missing the
pages just fault in on first write, as before.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import sys
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
"""From <linux/mman.h>."""
PAGE = 4096

_lock = threading.Lock()
_madvise: Any = None
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_usable = sys.platform == "linux"


def _setup() -> Any:
    global _madvise, _executor, _usable  # noqa: PLW0603 - one process-wide helper, made once
    with _lock:
        if _madvise is None and _usable:
            try:
                # The symbols the process has loaded, libc among them (`find_library`
                # would start a subprocess to look for it).
                libc = ctypes.CDLL(None, use_errno=True)
                madvise = libc.madvise
            except (OSError, AttributeError):
                _usable = False
                return None
            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            madvise.restype = ctypes.c_int
            _executor = concurrent.futures.ThreadPoolExecutor(1, "memspace-pages")
            _madvise = madvise
        return _madvise


def _populate(array: npt.NDArray[Any], start: int, end: int) -> None:
    """Populate the whole pages of bytes start..end of `array` (which the call keeps alive)."""
    global _usable  # noqa: PLW0603 - switched off once for the process if the kernel refuses
    base = array.ctypes.data
    first = (base + start + PAGE - 1) // PAGE * PAGE
    last = (base + end) // PAGE * PAGE
    if last <= first or _madvise is None:
        return
    if _madvise(first, last - first, MADV_POPULATE_WRITE) != 0:
        errno = ctypes.get_errno()
        _usable = False
        log.info("populating pages ahead is not available here (errno %d); not trying again", errno)


def ahead(array: npt.NDArray[np.generic], start: int, end: int) -> None:
    """Have the pages of bytes start..end of `array` (C-contiguous, its own memory) faulted
    in by the background thread. A hint: nothing waits for it, and its failure costs nothing
    but the page faults it would have saved."""
    if not _usable or end <= start or _setup() is None or _executor is None:
        return
    with contextlib.suppress(RuntimeError):  # the interpreter is shutting down
        _executor.submit(_populate, array, start, end)


def settled() -> None:
    """Wait until every range asked for so far was handled (for tests)."""
    if _executor is not None:
        _executor.submit(lambda: None).result()
