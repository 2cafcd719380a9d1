"""Output folders that appear whole or not at all, and that never replace what they must not.

Every output (a run's report folder, an export) is written like this:

1. ``check_destination``: refused, before any work, when it is a file, an existing folder without
   ``force``, the filesystem root, the home folder, the current folder or one of their ancestors,
   or the same as / inside / around a path the run reads (the model folder, its text files);
2. ``output_lock``: an OS file lock (``flock``) on ``.NAME.lock`` beside the output, held for the
   whole run, so a second run on the same output fails at once instead of racing the first; taking
   it also removes what a killed earlier run left (``.NAME.tmp-*``; a ``.NAME.old-*`` is put back
   when the output itself is missing);
3. ``staged_folder``: the files go to a temporary sibling ``.NAME.tmp-XXXXXXXX``; when the block
   succeeds, their modes are set from the umask, everything is fsynced, and the folder replaces the
   output in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames whose middle state
   the next run repairs), with SIGINT/SIGTERM/SIGHUP held back until the replace is over; on any
   exception, Ctrl-C or SIGTERM the temporary folder is removed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path


class OutputBusyError(FileExistsError):
    """Another run holds the output's lock."""


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_destination(out: Path, force: bool, *, protect=(), what: str = "output folder") -> None:
    """Refuse ``out`` (an absolute path) before any work: see the module docstring. ``protect``:
    paths the run reads (a model folder or file, text files); ``out`` may not be one of them, hold
    one, or lie inside a protected folder."""
    out = Path(os.path.abspath(out))
    shown = repr(str(out))
    home = Path(os.path.expanduser("~")).resolve()
    cwd = Path.cwd().resolve()
    if out == Path(out.anchor):
        raise ValueError(f"{what} {shown} is the filesystem root; give a folder of its own")
    for special, name in ((home, "your home folder"), (cwd, "the current folder")):
        if out == special:
            raise ValueError(f"{what} {shown} is {name}; give a new folder (e.g. {str(out / 'out')!r})")
        if _is_within(special, out):
            raise ValueError(f"{what} {shown} contains {name} ({str(special)!r}); replacing it would delete it")
    for p in protect:
        if p is None:
            continue
        p = Path(os.path.abspath(p))
        real = p.resolve()
        for q in {p, real}:
            if out == q:
                raise ValueError(f"{what} {shown} is an input of this run ({str(q)!r}); inputs are only read")
            if _is_within(q, out):
                raise ValueError(f"{what} {shown} contains {str(q)!r}, an input of this run; inputs are only read")
            if q.is_dir() and _is_within(out, q):
                raise ValueError(
                    f"{what} {shown} is inside {str(q)!r}, an input folder of this run; inputs are only read"
                )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{what} {shown} exists and is not a folder; it is never replaced")
    if out.exists() and not force:
        raise FileExistsError(f"{what} {shown} exists; pass --force to replace it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{str(parent)!r} is a file, so {shown} cannot be created")
            break


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(path.anchor)


def check_writable(out: Path, need_bytes: int = 0, *, what: str = "output folder") -> None:
    """The folder that will hold ``out`` accepts a new file (probed: a temporary file is created and
    removed) and has ``need_bytes`` free (plus 1%), before any work."""
    base = nearest_existing(Path(out).parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ecoflap-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(
            f"{what} {str(out)!r} cannot be written: creating a file in {str(base)!r} failed ({e.strerror})"
        ) from None
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes * 1.01:
            raise OSError(
                errno.ENOSPC,
                f"{what} {str(out)!r} needs about {_size(need_bytes)} and {str(base)!r} has {_size(free)} free",
            )


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ---- the lock ------------------------------------------------------------------------------------
_HELD: dict[Path, list] = {}  # out -> [fd, lock path, depth]
_HELD_GUARD = threading.Lock()


def _tmp_pattern(name: str) -> re.Pattern:
    # temporaries of an output: .NAME.tmp-XXXXXXXX (staged_folder), .NAME.model-XXXXXXXX (a streamed
    # run's checkpoint), .NAME.old-PID (the two-rename fallback); mkdtemp's suffix is 8 of [a-z0-9_]
    return re.compile(rf"^\.{re.escape(name)}\.((tmp|model)-[a-z0-9_]{{8}}|old-\d+)$")


def _remove_leftovers(out: Path) -> None:
    """Under the lock: what killed earlier runs on ``out`` left beside it. A ``.NAME.old-PID`` is
    the previous complete output when the two-rename fallback was cut between its renames: it is
    put back if ``out`` is missing."""
    pat = _tmp_pattern(out.name)
    found = [p for p in out.parent.iterdir() if pat.match(p.name)] if out.parent.is_dir() else []
    olds = sorted((p for p in found if ".old-" in p.name), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(out):
        os.rename(olds[-1], out)
        found.remove(olds[-1])
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextmanager
def output_lock(out: Path):
    """Hold the lock of output ``out`` (re-entrant within a process). A second process fails at
    once with ``OutputBusyError``. The lock file is removed when the holder is done, and so are the
    parent folders it had to create when no output appeared in them."""
    out = Path(os.path.abspath(out))
    with _HELD_GUARD:
        if out in _HELD:
            _HELD[out][2] += 1
            held = True
        else:
            held = False
    if held:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[out][2] -= 1
        return
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    lock = out.parent / f".{out.name}.lock"
    fd = None
    try:
        with signals_held():  # a Ctrl-C here is delivered once the state below is consistent
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = _acquire(lock, out)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            with _HELD_GUARD:
                _HELD[out] = [fd, lock, 1]
        _remove_leftovers(out)
        yield
    finally:
        with signals_held():
            if fd is not None:
                with _HELD_GUARD:
                    _HELD.pop(out, None)
                try:
                    os.unlink(lock)  # while holding it: a waiting process then sees a different inode and retries
                except OSError:
                    pass
                os.close(fd)
            for p in created:  # parents made for an output that never appeared: removed again (when empty)
                try:
                    p.rmdir()
                except OSError:
                    break


def _acquire(lock: Path, out: Path) -> int:
    """An fd of ``lock`` holding its exclusive flock, or OutputBusyError at once."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            finally:
                os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputBusyError(
                    f"output {str(out)!r} is being written by another run"
                    + (f" (process {pid})" if pid else "")
                    + f"; wait for it to finish or choose another output (lock: {str(lock)!r})"
                ) from None
            raise
        try:  # the file may have been removed by the previous holder between our open and flock
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


# ---- the atomic replace --------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) through libc; False where the OS, libc or filesystem lacks it."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish_tree(root: Path) -> None:
    """Modes from the umask (safetensors writes 0600 files, mkdtemp makes 0700 folders) and every
    file and folder fsynced, so the replace publishes complete, readable data."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            os.chmod(p, 0o666 & ~mask)
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(dirpath, 0o777 & ~mask)
    for dirpath, _, _ in os.walk(root, topdown=False):
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


@contextmanager
def signals_held():
    """SIGINT/SIGTERM/SIGHUP are recorded, not acted on, inside; re-delivered after. Python runs
    signal handlers in the main thread only, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {}
    for s in _SIGNALS:
        try:
            old[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _commit(tmp: Path, out: Path, force: bool) -> None:
    """Put folder ``tmp`` at ``out`` in one step; the previous ``out`` (with ``force``) is removed."""
    if os.path.lexists(out):
        if not force:
            raise FileExistsError(f"output folder {str(out)!r} appeared while this run was writing; nothing replaced")
        if _renameat2(tmp, out, _RENAME_EXCHANGE):  # tmp now holds the previous output
            _fsync_dir(out.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # no exchange: the previous output moves aside first; a kill between the two renames leaves
        # it at .NAME.old-PID, which the next run's output_lock puts back
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        _fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    if not _renameat2(tmp, out, _RENAME_NOREPLACE):
        os.rename(tmp, out)
    _fsync_dir(out.parent)


@contextmanager
def staged_folder(out: Path, force: bool):
    """Yield a temporary folder beside ``out``; if the block succeeds it replaces ``out`` in one step
    (see the module docstring). If it fails, is interrupted or the process is terminated, ``out`` is
    untouched and the temporary folder is removed; after a SIGKILL the next run on ``out`` removes it."""
    out = Path(os.path.abspath(out))
    check_destination(out, force)
    with output_lock(out):  # creates the parents, only after every check has passed
        tmp = None
        try:
            with signals_held():  # so that a Ctrl-C cannot fall between creating the folder and knowing it
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            yield tmp
            _finish_tree(tmp)
            with signals_held():
                _commit(tmp, out, force)
        finally:
            with signals_held():
                if tmp is not None and tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
