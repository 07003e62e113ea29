"""The database's files on disk: the lock on the file itself, their modes, and the marker
that says a job store was created here.

The marker is `.taskd.db.created` in the database's folder: a name that `rm taskd.db*` does
not reach, so that a store removed with its side files is noticed too.

The lock is an exclusive flock on the database file, so it follows the file whatever name
leads to it (a symlink, a hard link); the kernel's list of locks names the daemon holding
it. SQLite's own locks are POSIX byte-range locks, which flock does not touch on Linux.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
from pathlib import Path

from taskd.store.base import StoreError

logger = logging.getLogger(__name__)

SIDE_FILES = ("-wal", "-shm")  # SQLite's, beside the database; they get the database's mode
MARKER_SUFFIX = ".created"


def make_folder(folder: Path, group: int | None) -> None:
    """Create the database's folder if missing: 0700, or 0750 for the group."""
    if folder.exists():
        return
    try:
        folder.mkdir(parents=True, mode=0o700 if group is None else 0o750)
        if group is not None:
            os.chown(folder, -1, group)
    except OSError as exc:
        raise StoreError(f"cannot create {folder}: {exc.strerror}") from None


def lock_database(path: Path, mode: int, group: int | None, *, name: Path) -> tuple[int, bool]:
    """Open (or create, with `mode`) the database file and lock it; returns the held fd, and
    whether this call created the file.

    `name` is the path configured, which leads to the file `path`. Raises StoreError naming
    the daemon that holds the lock, or what keeps taskd from writing the file.
    """
    shown = f"{name}" if name == path else f"{name} (the file {path})"
    try:
        fd, created = _open_or_create(path, mode)
    except OSError as exc:
        raise StoreError(_cannot_write(shown, path, exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = holder_pid(fd)
        os.close(fd)
        raise StoreError(
            f"job store {shown} is in use by another taskd (pid {holder or 'unknown'}), "
            "maybe under another name (a symlink or hard link to the same file); stop it or "
            "give this one another --database"
        ) from None
    info = os.fstat(fd)
    if info.st_size == 0 and info.st_uid == os.geteuid():
        # New (or emptied): its mode is ours to set whatever the umask, and SQLite gives its
        # -wal and -shm files the database's mode.
        try:
            if group is not None:
                os.fchown(fd, -1, group)
            os.fchmod(fd, mode)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot set the mode or group of {path}: {exc.strerror}") from None
    if info.st_nlink > 1:
        logger.warning(
            "job store %s has %d hard links: open it by one name only, since SQLite finds its "
            "-wal file by the name it was opened with",
            path,
            info.st_nlink,
        )
    return fd, created


def _open_or_create(path: Path, mode: int) -> tuple[int, bool]:
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC), False
        except FileNotFoundError:
            pass
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), True
        except FileExistsError:
            continue  # created meanwhile by another process: open that one


def remove_created(path: Path) -> None:
    """Remove the database file that a start-up which failed had created, and its side files:
    a refused start leaves nothing behind."""
    for file in (path, *(Path(f"{path}{suffix}") for suffix in SIDE_FILES)):
        try:
            file.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot remove %s, created by this start: %s", file, exc.strerror)


def holder_pid(fd: int) -> int | None:
    """The pid holding a flock on the file open at `fd`, from /proc/locks (Linux)."""
    info = os.fstat(fd)
    file_id = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5432764 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file_id:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


def _cannot_write(shown: str, path: Path, exc: OSError) -> str:
    reason = f"cannot open job store {shown} for writing: {exc.strerror}"
    if exc.errno == errno.EACCES:
        return (
            f"{reason}; taskd runs as uid {os.geteuid()} and must be able to write the file "
            f"and its folder: check their owner and mode (ls -la {path.parent})"
        )
    if exc.errno == errno.EPERM:
        return f"{reason}; is it immutable or append-only? (lsattr {path}; chattr -i {path})"
    if exc.errno == errno.EROFS:
        return f"{reason}; its file system is mounted read-only"
    return reason


def secure(path: Path, mode: int, group: int | None) -> None:
    """Give the database and its side files `mode` (and `group`) if they are more open."""
    for file in (path, *(Path(f"{path}{suffix}") for suffix in SIDE_FILES)):
        try:
            info = file.stat()
        except FileNotFoundError:
            continue
        current = stat.S_IMODE(info.st_mode)
        wrong_group = group is not None and info.st_gid != group
        if current & ~mode or wrong_group:
            try:
                _set_mode(file, mode, group)
            except OSError as exc:
                logger.warning(
                    "%s has mode %04o, more open than %04o, and cannot be changed: %s",
                    file,
                    current,
                    mode,
                    exc.strerror,
                )
                continue
            if current & ~mode:
                logger.warning("%s had mode %04o; taskd made it %04o", file, current, mode)


def _set_mode(path: Path, mode: int, group: int | None) -> None:
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, mode)


def marker_path(path: Path) -> Path:
    return path.parent / f".{path.name}{MARKER_SUFFIX}"


def _old_marker_path(path: Path) -> Path:
    """Where earlier versions kept the marker (`taskd.db.created`, which `rm taskd.db*` took);
    one found there is honoured, and moved."""
    return Path(f"{path}{MARKER_SUFFIX}")


def existing_marker(path: Path) -> Path | None:
    """The marker that says taskd had created a job store at `path`, if there is one."""
    for marker in (marker_path(path), _old_marker_path(path)):
        if marker.exists():
            return marker
    return None


def write_marker(path: Path, mode: int) -> None:
    """Note beside the database that a job store lives here (so that losing it is noticed)."""
    marker = marker_path(path)
    old = _old_marker_path(path)
    if old.exists():
        try:
            os.replace(old, marker)
        except OSError as exc:
            logger.warning("cannot rename %s to %s: %s", old, marker, exc.strerror)
    if marker.exists():
        return
    noted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = (
        f"taskd keeps its job store {path.name} here (noted on {noted}).\n"
        f"While this file exists, taskd refuses to start if {path.name} is missing or empty\n"
        "(its jobs lost); start it once with --allow-empty-store, or remove this file, to\n"
        "begin with an empty store.\n"
    )
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "w") as file:
            file.write(text)
    except FileExistsError:
        pass
    except OSError as exc:
        logger.warning(
            "cannot write %s (%s): taskd will not notice if %s is lost",
            marker,
            exc.strerror,
            path,
        )
