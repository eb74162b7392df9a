"""Temporary names in a workspace and their clean-up, the pre-flight of a folder a command will
write into, and lock files naming their process: what every writer (checkpoints, the report, the
cost-table cache, a recipe search's study) shares."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

from tinycompress.errors import TinycompressError

# Temporary folders and files are named ``.tmp-<label>-<host>-<pid>-<token>[.suffix]``: a folder
# left by a killed writer on this host can be told apart from one a live process is writing, and
# one made by another machine sharing the workspace is left alone until it is a day old.
_TEMPORARY = re.compile(r"^\.tmp-(?P<label>[a-z0-9_]+)-(?P<host>[A-Za-z0-9.]+)-(?P<pid>\d+)-[0-9a-f]{8}(\.[a-z]+)?$")
# Written by earlier versions, without the host: only the process id tells.
_LEGACY_TEMPORARY = re.compile(r"^\.tmp-[a-z]+-(?P<pid>\d+)-[0-9a-f]{8}$")
_LEGACY_REPORT_TEMPORARY = re.compile(r"^\.tmp-[A-Za-z0-9_.-]+-[0-9a-f]{8}$")
FOREIGN_TEMPORARY_AGE_SECONDS = 24 * 3600


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname()) or "host"


def temporary_path(root: Path, label: str, suffix: str = "") -> Path:
    """A fresh name in ``root`` for something written and then renamed into place; its writer
    (host and process) is in the name, see :func:`remove_orphaned_temporaries`."""
    label = re.sub(r"[^a-z0-9_]", "_", label.lower()) or "x"
    return root / f".tmp-{label}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except (OverflowError, ValueError):  # not a possible process id
        return False
    return True


def _is_orphan(child: Path) -> bool:
    match = _TEMPORARY.match(child.name)
    if match:
        if match["host"] == _host():
            return not _pid_alive(int(match["pid"]))
        try:
            return time.time() - child.lstat().st_mtime > FOREIGN_TEMPORARY_AGE_SECONDS
        except OSError:
            return False
    legacy = _LEGACY_TEMPORARY.match(child.name)
    if legacy:
        return child.is_dir() and not _pid_alive(int(legacy["pid"]))
    if _LEGACY_REPORT_TEMPORARY.match(child.name):  # no writer in the name: only its age tells
        try:
            return time.time() - child.lstat().st_mtime > FOREIGN_TEMPORARY_AGE_SECONDS
        except OSError:
            return False
    return False


def remove_orphaned_temporaries(root: Path) -> None:
    """Delete temporaries (see :func:`temporary_path`) whose writer is gone: on this host, a
    process that no longer runs (killed mid-write, e.g. SIGKILL); on another host, a day old."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(".tmp-") and _is_orphan(child):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()


def check_writable(folder: str | Path, fix: str = "pass a writable --workdir") -> Path:
    """Pre-flight of a command that writes into ``folder``: make it (with its parents), then write
    and remove a probe file, so an unwritable place fails before the work rather than after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(folder, "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (exc.strerror or str(exc))
        raise TinycompressError(f"cannot write to {folder}: {why}", fix) from None
    return folder


@contextlib.contextmanager
def held_by_this_process(lock: Path, what: str):
    """Hold ``lock`` (a file naming this host and process) while the block runs, so two processes
    never work on ``what`` at once; a lock left by a dead process on this host is taken over."""
    me = f"{_host()} {os.getpid()}\n"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = lock.read_text(encoding="utf-8").split()
            except (OSError, ValueError):
                host, pid = _host(), "0"  # unreadable or half-written: its writer is gone
            if host != _host() or (pid.isdigit() and _pid_alive(int(pid))):
                raise TinycompressError(
                    f"{what} is in use by process {pid} on {host} ({lock})",
                    f"wait for it to finish, or delete {lock} if that process is gone",
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(me)
        break
    else:
        raise TinycompressError(f"could not take {lock} for {what}", f"delete {lock} and try again")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
