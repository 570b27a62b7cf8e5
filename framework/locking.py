"""`file_lock(path, what)`: an inter-process file lock that cannot hang.

filelock's `FileLock` retries for ever when the lock file cannot be created in a directory that
exists (e.g. under /proc, or where the filesystem refuses the file): it takes that for a lock
held by someone else. Here the wait is in short polls; after a poll that timed out, a lock file
that does not exist means nobody holds the lock and we cannot create it, which is an error (one
line, within `poll_s`). A lock that another process really holds is waited for, with one line
saying so, for at most `wait_s`.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Callable, Iterator, Optional

from framework.errors import ConfigError


@contextlib.contextmanager
def file_lock(path: str, what: str, *, poll_s: float = 2.0, wait_s: float = 900.0
              ) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(path)
    start, told = time.monotonic(), False
    while True:
        try:
            lock.acquire(timeout=poll_s)
            break
        except Timeout:
            if not os.path.exists(path):
                raise ConfigError(f"cannot take the file lock {path} ({what}): the lock file "
                                  f"cannot be created in {os.path.dirname(path)}") from None
            waited = time.monotonic() - start
            if waited > wait_s:
                raise ConfigError(f"gave up after {waited:.0f} s waiting for the file lock {path} "
                                  f"({what}); if no other process is preparing it, delete "
                                  f"the lock file") from None
            if not told:
                print(f"waiting for {path}: another process is preparing {what}", flush=True)
                told = True
        except OSError as e:  # no permission, not a directory, read-only filesystem, ...
            raise ConfigError(f"cannot take the file lock {path} ({what}): "
                              f"{e.strerror or e}") from None
    try:
        yield
    finally:
        lock.release()


RUN_LOCK = ".run.lock"


def _dead_holder(holder: str, host: str) -> bool:
    """Whether a lock file's line ('pid <n> on <host> since ...') names a process of `host`
    that no longer exists."""
    m = re.match(r"pid (\d+) on (\S+) ", holder)
    return m is not None and m.group(2) == host and not _alive(int(m.group(1)))


def _flock_or_wait_for_the_dead(fd: int, host: str, wait_s: float = 30.0) -> None:
    """flock `fd` at once, or raise BlockingIOError. A lock whose recorded holder is a process of
    this host that no longer exists is held by its forked children (DataLoader workers share the
    lock) for the moments they outlive it: wait up to `wait_s` for them (a torchrun restart)."""
    import fcntl

    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not _dead_holder(os.pread(fd, 200, 0).decode(errors="replace"), host) or \
                    time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _holders(fd: int) -> list:
    """'pid <n> (<command>)' of the other processes of this host (Linux /proc) that have the
    file open on `fd` open too: who holds its flock."""
    st = os.fstat(fd)
    found = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return found
    for pid in pids:
        try:
            for f in os.listdir(f"/proc/{pid}/fd"):
                t = os.stat(f"/proc/{pid}/fd/{f}")
                if (t.st_dev, t.st_ino) == (st.st_dev, st.st_ino):
                    with open(f"/proc/{pid}/cmdline", "rb") as c:
                        cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
                    found.append(f"pid {pid} ({cmd[:60]}{'...' if len(cmd) > 60 else ''})")
                    break
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def hold_if_a_run_lock(directory: str) -> Optional[Callable[[], None]]:
    """For a tool about to replace an existing `directory` (data_tools.convert --save): take the
    run lock there, as a training run saving there would, with this process named as its
    holder, and keep it until the fd returned is closed (a run that starts meanwhile is refused,
    naming the tool). Held by a running training run: a ConfigError naming it (a replace would
    delete the checkpoints it writes). Returns the call that releases it (and removes the lock
    file where this call made it and the directory is still there); None, and nothing held,
    where the lock cannot be taken (an unwritable directory, no flock)."""
    import errno
    import fcntl
    import socket
    import stat

    path = os.path.join(directory, RUN_LOCK)
    made = not os.path.lexists(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise _not_a_lock(directory, path, "--save") from None
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock(directory, path, "--save")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"--save {directory} is in use by a training run saving there "
                          f"({holder}): replacing it would delete the checkpoints that run "
                          f"writes; wait for it to end, or give another --save") from None
    except OSError:  # no flock on this filesystem
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} (data_tools.convert)\n".encode(), 0)

    def release() -> None:
        try:  # the file is still this one (not replaced along with the directory)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if same and made:  # leave an empty --save as it was
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)

    return release


def _not_a_lock(ckpt_dir: str, path: str, what: str = "checkpoint.dir") -> ConfigError:
    return ConfigError(f"{what}={ckpt_dir}: {path} is not a regular file (a symlink, "
                       f"directory or other special file), so the run lock that keeps two runs "
                       f"from saving here at once cannot be taken: remove it and run again")


@contextlib.contextmanager
def run_lock(ckpt_dir: str) -> Iterator[None]:
    """Hold `<ckpt_dir>/.run.lock` for a training run that saves there. Two runs saving into one
    checkpoint directory remove each other's staging directories and replace each other's
    checkpoints, so a second run is refused in one line, naming the first (its pid, host and
    start time). The lock is the kernel's (flock): it goes with the process, so a killed run
    leaves nothing to clean up. Where the filesystem has no flock (some network mounts), the run
    goes on without it."""
    import socket

    path = os.path.join(ckpt_dir, RUN_LOCK)
    created = []  # the directories this call makes, deepest first (removed again if left empty)
    d = os.path.abspath(ckpt_dir)
    while d and not os.path.exists(d) and d != os.path.dirname(d):
        created.append(d)
        d = os.path.dirname(d)
    import stat

    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        # never through a symlink (the pid line would overwrite its target), never a FIFO
        # (an open would block)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError:
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise _not_a_lock(ckpt_dir, path) from None
        # the plan's checks name an unwritable directory; a save would say so too
        yield
        return
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock(ckpt_dir, path)
    held = False
    try:
        try:
            _flock_or_wait_for_the_dead(fd, socket.gethostname())
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if _dead_holder(holder, socket.gethostname()):
                # the run is gone; what it started still holds the lock (a stuck child)
                left = _holders(fd) or ["none found: see `fuser -v " + path + "`"]
                raise ConfigError(
                    f"checkpoint.dir={ckpt_dir} is still locked, and the run that took the lock "
                    f"({holder.split(' since ')[0]}) is not running here (unless in another "
                    f"container with this host name); processes with the lock file open: "
                    f"{'; '.join(left[:4])}; if they are left over from that run, stop them "
                    f"(kill -9 <pid>) and run again") from None
            raise ConfigError(
                f"checkpoint.dir={ckpt_dir} is in use by another run ({holder}): two runs saving "
                f"into one directory would delete each other's checkpoints; wait for it to end, "
                f"or give this run another checkpoint.dir") from None
        except OSError:  # no flock on this filesystem: go on unguarded
            os.close(fd)
            fd = -1
            yield
            return
        try:  # the file may have been unlinked by a run that ended as we opened it
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            same = False
        if not same:
            os.close(fd)
            fd = -1
            with run_lock(ckpt_dir):  # again, on the file that is there now
                yield
            return
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        if held:  # leave the directory as the run left it: no lock file, and not even the
            # directory where this run made it and saved nothing (a killed run's file is reused)
            with contextlib.suppress(OSError):
                os.unlink(path)
            for made in created:  # (rmdir fails, and stops here, on one that is not empty)
                try:
                    os.rmdir(made)
                except OSError:
                    break
        if fd >= 0:
            os.close(fd)  # releases the lock
