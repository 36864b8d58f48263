"""Child processes that stop when their parent does.

A process pool's workers or a sweep's job processes whose parent is killed (``kill -9``, the
sweeper's job stopped) would otherwise go on, orphaned, finishing work no one will read and then
waiting on their queue forever. :func:`exit_with_parent` is a pool ``initializer`` for that.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

POLL_S = 1.0


def _watch(parent: int, what: str) -> None:
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent:
            log.error("%s: parent process %d is gone, stopping", what, parent)
            os._exit(1)


def exit_with_parent(parent: int, what: str = "worker") -> None:
    """Exit this process (status 1) within about a second once ``parent`` (the pid of the
    process that started it, taken there: the parent may die before this runs) is no longer
    its parent; ``what`` names it in the one log line. Call it first thing in the child, or
    pass it as a pool's ``initializer`` with ``initargs=(os.getpid(),)``."""
    threading.Thread(target=_watch, args=(parent, what), daemon=True).start()
