"""What a run directory guarantees: one writer, atomic files, checksummed checkpoints.

- `RunLock`: an OS file lock (flock) on OUT/run.lock, held for the whole run. The kernel drops
  it when the process ends, however it ends (a SIGKILL included), so a stale lock file is no
  obstacle; a live holder is named by its PID.
- `save_checkpoint` / `load_checkpoint`: a checkpoint holds its format version and a SHA-256
  digest of its own contents. A new one is written beside the old, read back and verified before it replaces
  it; the one it replaces is kept as ckpt.prev.pt. A load that fails the check names the file
  and the last good checkpoint.
- `read_metrics`: metrics.jsonl with a torn last line (a full disk, a power loss during the
  append) loses that line with a warning; a corrupt line elsewhere names the file and line.
- `writing`: an OSError while writing a run file (ENOSPC, EIO, EACCES, ...) becomes one line
  saying what could not be written, what is intact and how to continue.

This module imports nothing else of fastmix: the store, the model and the loop all use it.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import warnings

import numpy as np
import torch

LOCK_FILE = "run.lock"
CHECKPOINT = "ckpt.pt"
PREVIOUS_CHECKPOINT = "ckpt.prev.pt"
CHECKSUM_KEY = "checksum"
FORMAT_KEY = "format_version"
# 2: written with its format version (and a checksum). 1: what fastmix wrote before it wrote a
# version; the loop upgrades it when it loads one (fastmix.train).
CHECKPOINT_FORMAT = 2


class RunError(Exception):
    """A run directory that cannot be used as asked: the `fastmix` commands print the message alone."""


class RunLockedError(RunError):
    """Another live process holds the run directory's lock."""


class CheckpointError(RunError):
    """A checkpoint that is corrupt, truncated, or fails its checksum."""


class MetricsError(RunError):
    """A metrics.jsonl line that is not a record, before its last line."""


class RunWriteError(RunError):
    """The operating system refused a write of a run (or store) file."""


# ---------------------------------------------------------------------------------------------
# one writer

class DirectoryLock:
    """An exclusive flock on DIRECTORY/NAME, which holds the holder's PID.

        with DirectoryLock(out, "run.lock", what="a fastmix train") as lock: ...

    `held_elsewhere(path)` tells whether a live process holds the lock at that file."""

    def __init__(self, directory, name=LOCK_FILE, what="another process"):
        self.path = os.path.join(directory, name)
        self.what = what
        self.fd = None

    def acquire(self):
        while True:
            fd = self._lock_fd()
            # a cleaner that removed a dead holder's lock file meanwhile: this lock guards nothing
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _lock_fd(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            directory = os.path.dirname(self.path)
            raise RunLockedError(f"{directory} is in use by {self.what} (PID {holder}, lock {self.path}): "
                                 "wait for it to end, or use another directory") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def held(self):
        return self.fd is not None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def held_elsewhere(path):
    """True when a live process holds the DirectoryLock at `path` (a missing file: False)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


class RunLock(DirectoryLock):
    """The lock of a run directory (created if missing), held while a run writes into it."""

    def __init__(self, out):
        super().__init__(out, LOCK_FILE, what="another fastmix train")

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        return super().acquire()


# ---------------------------------------------------------------------------------------------
# write errors

_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


@contextlib.contextmanager
def writing(path, intact, resume):
    """Turns an OSError while writing `path` into a RunWriteError of one line: what could not be
    written, `intact` (what is still whole) and `resume` (how to go on)."""
    try:
        yield
    except OSError as error:
        if error.errno not in _WRITE_ERRORS:  # a missing file, a name taken, ...: not the disk's refusal
            raise
        path = error.filename or path
        reason = error.strerror or str(error)
        hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
                errno.EACCES: "make it writable", errno.EPERM: "make it writable",
                errno.EROFS: "the file system is read-only: use a writable one",
                errno.EIO: "the disk reported an I/O error: check it",
                errno.EFBIG: "the file is larger than this file system or process allows"}[error.errno]
        raise RunWriteError(f"could not write {path}: {reason}. {intact}. {hint[0].upper() + hint[1:]}, "
                            f"then {resume}") from None


def fsync_directory(directory):
    """Makes a rename inside `directory` survive a power loss (where the OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_atomic(path, write):
    """write(f) writes the new contents of `path` to a binary file beside it, which then replaces
    `path`: an error, a crash or a Ctrl-C meanwhile leaves the old file whole, and no temporary
    one. OSError is left to the caller (see `writing`)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path, text):
    replace_atomic(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------
# checkpoints

def state_digest(state):
    """SHA-256 (hex) of a checkpoint's contents: every tensor's dtype, shape and bytes, and every
    other value, walked in order. The same after a save and load, whatever the map_location."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest, value):
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"A{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        items = [(key, item) for key, item in value.items() if key != CHECKSUM_KEY]
        digest.update(f"D{len(items)}".encode())
        for key, item in items:
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:  # anything else a state may hold: its pickle (deterministic for plain objects)
        digest.update(b"P" + pickle.dumps(value, protocol=4))


def save_checkpoint(path, state, resume_hint="continue with --resume"):
    """Writes `state` with its checksum to `path`: to path.tmp, read back and verified, then the
    current `path` becomes ckpt.prev.pt and the new file replaces it. A write error is a
    RunWriteError naming the file and the checkpoint that is intact."""
    directory = os.path.dirname(os.path.abspath(path))
    previous = os.path.join(directory, PREVIOUS_CHECKPOINT)
    state = {**state, FORMAT_KEY: CHECKPOINT_FORMAT}
    state[CHECKSUM_KEY] = state_digest(state)
    tmp = path + ".tmp"
    intact = (f"The previous checkpoint {path} (step {_step_or_unknown(path)}) is intact"
              if os.path.exists(path) else "No checkpoint was written yet")
    with writing(path, intact, resume_hint):
        try:
            with open(tmp, "wb") as f:
                try:
                    torch.save(state, f)
                except RuntimeError as error:  # torch's zip writer hides the OSError of a failed write
                    cause = _os_error_behind(error)
                    if cause is None:
                        raise
                    raise cause from None
                f.flush()
                os.fsync(f.fileno())
            # read back what the disk holds before it replaces the last good checkpoint
            written = torch.load(tmp, map_location="cpu", weights_only=False, mmap=True)
            if written.get(CHECKSUM_KEY) != state_digest(written):
                raise OSError(errno.EIO, "reading it back gave other bytes than were written")
            del written
            if os.path.exists(path):  # keep the last good one: a hard link, so `path` never goes missing
                with contextlib.suppress(FileNotFoundError):
                    os.remove(previous + ".tmp")
                try:
                    os.link(path, previous + ".tmp")
                except OSError:  # a file system without hard links: a copy
                    shutil.copyfile(path, previous + ".tmp")
                os.replace(previous + ".tmp", previous)
            os.replace(tmp, path)
        except BaseException:
            for leftover in (tmp, previous + ".tmp"):
                with contextlib.suppress(OSError):
                    os.remove(leftover)
            raise
    fsync_directory(directory)


def _os_error_behind(error):
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def _step_or_unknown(path):
    try:
        return checkpoint_step(path)
    except CheckpointError:
        return "unknown"


def peek_checkpoint(path):
    """The checkpoint at `path` memory-mapped, its tensors unread and unverified (for its step,
    config and names); a file that does not load is the CheckpointError of `load_checkpoint`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if isinstance(state, dict) and "step" in state:
            return state
    except Exception:  # noqa: BLE001 - any failure: load_checkpoint says what is wrong, in one line
        pass
    return load_checkpoint(path)


def checkpoint_step(path):
    """The step of the checkpoint at `path` (unverified); None when there is no file."""
    return peek_checkpoint(path)["step"] if os.path.exists(path) else None


def load_checkpoint(path, map_location="cpu"):
    """The verified state at `path`. CheckpointError (one line, naming the last good checkpoint
    of the directory) when it is unreadable, truncated or fails its checksum, or one line saying
    so when a newer fastmix wrote it. A checkpoint without a checksum (from an older fastmix)
    loads with a warning."""
    state, problem = _load_verified(path, map_location)
    if problem is None:
        version = state.get(FORMAT_KEY, 1)
        if version > CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: written by a newer fastmix (checkpoint format {version}; this one reads "
                                  f"formats up to {CHECKPOINT_FORMAT}): upgrade fastmix to use it")
        return state
    previous = os.path.join(os.path.dirname(os.path.abspath(path)), PREVIOUS_CHECKPOINT)
    if os.path.abspath(path) == previous or not os.path.exists(previous):
        last_good = "there is no earlier checkpoint"
    else:
        good, previous_problem = _load_verified(previous, "cpu")
        if previous_problem is None:
            last_good = (f"the last good one is {previous} (step {good['step']}): to continue from it, "
                         f"`mv {previous} {path}` and --resume")
        else:
            last_good = f"the earlier {previous} is damaged too ({previous_problem})"
    raise CheckpointError(f"{path}: {problem}; {last_good}")


def _load_verified(path, map_location):
    """(state, None) or (None, what is wrong with the file)."""
    try:
        if os.path.getsize(path) == 0:
            return None, "the file is empty (a write that never finished)"
        state = torch.load(path, map_location=map_location, weights_only=False)
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a file torch cannot load is damaged, whatever the error
        return None, f"corrupt or truncated checkpoint, it does not load ({_reason(error)})"
    if not isinstance(state, dict) or "step" not in state:
        return None, "not a fastmix checkpoint"
    stored = state.get(CHECKSUM_KEY)
    if stored is None:
        warnings.warn(f"{path} has no checksum (written by an older fastmix): loaded unverified", stacklevel=3)
    elif stored != state_digest(state):
        return None, "corrupt checkpoint: its contents do not match its checksum"
    return state, None


def _reason(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:120]}" if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# metrics

def read_metrics(path, up_to_step=None):
    """The records of a metrics.jsonl (those at or before `up_to_step`). A last line that does not
    parse was torn by a write that never finished: dropped, with a warning. A line that does not
    parse anywhere else is a MetricsError naming the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not any(rest.strip() for rest in lines[number:]):
                warnings.warn(f"{path}:{number}: dropped a torn last line (a write that never finished)",
                              stacklevel=2)
                break
            message = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            raise MetricsError(f"{path}:{number}: corrupt metrics record ({message}); remove or repair "
                               "that line to continue") from None
        records.append(record)
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]
