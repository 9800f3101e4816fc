"""Run directories: claiming a new one, locking one while a process trains in it, and keeping its logs
consistent with its checkpoint.

A new run claims its directory with os.mkdir (atomic: of two runs started together, exactly one
gets each name; the other moves to the next index) and takes the lock before anything else is
loaded. The lock (`train.lock`, holding the owner's pid and host) is an flock on that file: the
kernel drops it when the process dies, even after kill -9, so a stale file never blocks a resume,
while a resume of a directory that a live process is training is refused.
"""
from __future__ import annotations

import json
import os
import re
import socket
from typing import Dict, List, Optional

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked (claiming by mkdir still works)
    fcntl = None

LOCK = "train.lock"
# What a new run writes before it has trained anything: removed again when it fails to start.
UNSTARTED_FILES = ("config.json", "reals.png", LOCK)


class RunDirError(ValueError):
    """A run directory cannot be used (taken, busy, not creatable)."""


class RunLock:
    """An exclusive, non-blocking lock on a run directory, released by release() or process death."""

    def __init__(self, run_dir: str):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RunDirError(f"{self.path}: cannot create the lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise RunDirError(f"{self.run_dir} is being trained by another process ({owner}, per {self.path}); "
                                  "wait for it to finish or stop it first") from None
            # The previous owner may have removed the file between our open and flock: then we hold
            # the lock of a file nobody else sees; try again on the current one.
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # removed while still held, so that no other process can lock the old file after us
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "owner unknown"


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _mkdir(path: str, option: str) -> bool:
    """os.mkdir; False if it exists; RunDirError naming the option and path for any other OSError."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        if not os.path.isdir(path):
            raise RunDirError(f"{option} {path}: exists and is not a directory") from None
        return False
    except OSError as e:
        raise RunDirError(f"{option} {path}: cannot create the directory ({e.strerror})") from None


def make_outdir(outdir: str) -> None:
    """Create --outdir and its parents; errors name the option and the path."""
    if os.path.isdir(outdir):
        return
    try:
        os.makedirs(outdir)
    except FileExistsError:
        if not os.path.isdir(outdir):
            raise RunDirError(f"--outdir {outdir}: exists and is not a directory") from None
    except OSError as e:
        raise RunDirError(f"--outdir {outdir}: cannot create it ({e.strerror}: {e.filename})") from None


def claim_indexed(outdir: str, suffix: str) -> str:
    """Create `<outdir>/<index>-<suffix>` with the next free index. mkdir is the claim: a directory that
    appeared since the listing (another run starting at the same moment) moves us to the next index."""
    make_outdir(outdir)
    index = 1 + max((int(m.group(1)) for d in os.listdir(outdir) if (m := re.match(r"^(\d+)-", d))), default=-1)
    for index in range(index, index + 10000):
        path = os.path.join(outdir, f"{index:05d}-{suffix}")
        if _mkdir(path, "--outdir"):
            return path
    raise RunDirError(f"--outdir {outdir}: no free run index found")


def claim_named(outdir: str, name: str) -> tuple:
    """Create (or reuse, when it holds no run) `<outdir>/<name>`. Returns (path, created)."""
    make_outdir(outdir)
    path = os.path.join(outdir, name)
    return path, _mkdir(path, "--name")


def discard_unstarted(run_dir: str, created: bool) -> None:
    """Remove what a new run wrote before it failed to start, never anything else: in a directory this
    process created, its first files and then the directory if empty; in an existing one (--name),
    only the config.json it wrote (there was none before)."""
    for f in UNSTARTED_FILES if created else ("config.json",):
        try:
            os.unlink(os.path.join(run_dir, f))
        except OSError:
            pass
    if created:
        try:
            os.rmdir(run_dir)
        except OSError:
            pass


# ---- logs ---------------------------------------------------------------------------------------

def append_jsonl(path: str, row: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_jsonl(path: str) -> List[Dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def count_rows(path: str) -> int:
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def truncate_jsonl(path: str, keep: int) -> int:
    """Keep the first `keep` rows of a jsonl file (rewritten atomically); returns how many were dropped.
    A line cut off by a kill in mid-write is dropped with them."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if len(lines) <= keep and all(line.endswith("\n") for line in lines):
        return 0
    kept = [line if line.endswith("\n") else line + "\n" for line in lines[:keep]]
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)
