"""Writing results all or nothing: temporary files beside their targets, renamed at the end."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def staged_outputs() -> Iterator[Callable[[Path], Path]]:
    """Yields ``temp_for(target)``: a hidden temporary file beside ``target``.

    On normal exit every temporary file is renamed onto its target; on an exception all of
    them, and the folders created for them, are removed, so nothing is written.
    """
    temps: list[tuple[Path, Path]] = []
    created: list[Path] = []
    umask = os.umask(0)
    os.umask(umask)

    def temp_for(target: Path) -> Path:
        missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
        created.extend(reversed(missing))
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual mode
        temps.append((Path(name), target))
        return Path(name)

    try:
        yield temp_for
        for tmp, target in temps:
            os.replace(tmp, target)
        created.clear()  # committed: the new folders hold the outputs
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)  # only left when something failed
        for folder in reversed(created):  # deepest first
            with suppress(OSError):
                folder.rmdir()


def write_atomically(writers: Iterable[tuple[Path, Callable[[Path], None]]]) -> None:
    """Call each ``writer(tmp)`` on a temporary file beside its target, then rename all.

    If any writer fails, every temporary file is removed and no target is touched.
    """
    with staged_outputs() as temp_for:
        for target, writer in writers:
            writer(temp_for(target))


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on directory ``folder`` (none where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
