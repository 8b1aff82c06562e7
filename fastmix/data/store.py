"""DomainStore: a directory of token files, one per domain and split, described by meta.json.

Layout (format version 1):

    STORE/meta.json               format, version, dtype, vocab size, tokenizer, names, token counts
    STORE/tokens/NAME.train.bin   raw tokens (uint16, or uint32 when the vocabulary needs it)
    STORE/tokens/NAME.val.bin     held-out tokens of the same domain

Training domains and target tasks share this format; target tasks are listed in
`meta["targets"]` and are never sampled for training, only used by mixers and evaluation.
`meta["relations"]` (optional) maps a target to the domains known to help it.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict

import numpy as np

from fastmix.rundir import DirectoryLock, RunLockedError

FORMAT = "fastmix-domain-store"
VERSION = 1
SPLITS = ("train", "val")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Memmaps kept open at once: each costs a kernel mapping, and Linux allows ~65k per process.
_OPEN_MEMMAPS = 1024


class StoreError(ValueError):
    """A store that is missing, corrupt, truncated or of an unknown format."""


def token_dtype(vocab_size):
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _token_path(root, name, split):
    return os.path.join(root, "tokens", f"{name}.{split}.bin")


class DomainStore:
    """Opens and validates a store; hands out memory-mapped token arrays by name or index."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.isdir(self.path):
            raise StoreError(f"{path}: no such store directory (build one with `fastmix prepare`)")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise StoreError(f"{path}: not a fastmix store (meta.json is missing)") from None
        except json.JSONDecodeError as e:
            raise StoreError(f"{meta_path}: corrupt meta.json ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise StoreError(f"{meta_path}: not a fastmix store (format is not {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise StoreError(f"{meta_path}: store format version {meta.get('version')!r}, "
                             f"this fastmix reads version {VERSION}")
        try:
            self.domains = list(meta["domains"])
            self.targets = list(meta.get("targets", []))
            self.vocab_size = int(meta["vocab_size"])
            self.dtype = np.dtype(meta["dtype"])
            self.tokenizer = dict(meta["tokenizer"])
            counts = meta["tokens"]
            self._counts = {name: {s: int(counts[name][s]) for s in SPLITS}
                            for name in self.domains + self.targets}
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{meta_path}: corrupt meta.json (bad or missing entry {e})") from None
        self.relations = dict(meta.get("relations", {}))
        self.meta = meta
        if self.dtype != token_dtype(self.vocab_size):
            raise StoreError(f"{meta_path}: dtype {self.dtype} does not match vocab size {self.vocab_size}")
        if not self.domains:
            raise StoreError(f"{meta_path}: the store has no domains")
        repeated = sorted({n for n in self.domains + self.targets if (self.domains + self.targets).count(n) > 1})
        if repeated:
            raise StoreError(f"{meta_path}: the name {repeated[0]!r} is listed more than once among the domains "
                             "and targets (corrupt meta.json: each names one token file)")
        self._validate_files()
        self._validate_tokens()
        self.train_tokens = np.array([self._counts[n]["train"] for n in self.domains], dtype=np.int64)
        self.val_tokens = np.array([self._counts[n]["val"] for n in self.domains], dtype=np.int64)
        self._index = {name: i for i, name in enumerate(self.domains)}
        self._memmaps = OrderedDict()
        self._lock = threading.Lock()  # the sampler's prefetch thread reads too

    def _validate_files(self):
        itemsize = self.dtype.itemsize
        for name, counts in self._counts.items():
            for split in SPLITS:
                path = _token_path(self.path, name, split)
                try:
                    size = os.path.getsize(path)
                except OSError:
                    raise StoreError(f"{path}: token file is missing (store is incomplete)") from None
                if size != counts[split] * itemsize:
                    raise StoreError(
                        f"{path}: {size} bytes, meta.json says {counts[split]} tokens of "
                        f"{itemsize} bytes = {counts[split] * itemsize} (truncated or corrupt store)")

    def _validate_tokens(self):
        """Every token id must be below vocab_size (else training fails mid-run with an index
        error). Reading every token is slow for a large store, so each file's largest id is
        cached by its size and modification time, and read again only when the file changes."""
        cache_path = os.path.join(cache_dir(), "validated",
                                  hashlib.sha256(self.path.encode()).hexdigest()[:32] + ".json")
        try:
            with open(cache_path, encoding="utf-8") as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = {}
        seen, changed = {}, False
        for name in self._counts:
            for split in SPLITS:
                path = _token_path(self.path, name, split)
                stat = os.stat(path)
                key = f"{name}.{split}"
                entry = cached.get(key)
                if not (isinstance(entry, list) and entry[:2] == [stat.st_size, stat.st_mtime_ns]):
                    entry, changed = [stat.st_size, stat.st_mtime_ns, self._largest_id(path, name, split)], True
                seen[key] = entry
                if entry[2] >= self.vocab_size:
                    raise StoreError(f"{path}: token id {entry[2]} >= the store's vocab_size {self.vocab_size} "
                                     "(corrupt, or written with another tokenizer than meta.json names)")
        if changed:
            with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
                os.makedirs(os.path.dirname(cache_path), exist_ok=True)
                tmp = f"{cache_path}.{os.getpid()}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(seen, f)
                os.replace(tmp, cache_path)

    def _largest_id(self, path, name, split):
        if self._counts[name][split] == 0:
            return -1
        tokens = np.memmap(path, dtype=self.dtype, mode="r")
        step = 1 << 26
        return max(int(tokens[i:i + step].max()) for i in range(0, tokens.size, step))

    @property
    def num_domains(self):
        return len(self.domains)

    def domain_index(self, name):
        return self._index[name]

    def num_tokens(self, name, split="train"):
        return self._counts[name][split]

    def tokens(self, name, split="train"):
        """Memory-mapped tokens of a domain or target (by name, or domain index)."""
        name = self._name(name, split)
        with self._lock:
            return self._memmap(name, split)

    def read(self, name, split, start, length):
        """tokens(name, split)[start:start + length] as a new array: from the memmap when it is
        open or can still be opened, else by a plain read (cheaper than mapping a file once)."""
        name = self._name(name, split)
        with self._lock:
            array = self._memmaps.get((name, split))
            if array is not None or len(self._memmaps) < _OPEN_MEMMAPS:
                return np.array(self._memmap(name, split)[start:start + length])
        itemsize = self.dtype.itemsize
        fd = os.open(_token_path(self.path, name, split), os.O_RDONLY)
        try:
            data = os.pread(fd, length * itemsize, start * itemsize)
        finally:
            os.close(fd)
        return np.frombuffer(data, dtype=self.dtype)

    def _name(self, name, split):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return name if isinstance(name, str) else self.domains[name]

    def _memmap(self, name, split):
        key = (name, split)
        array = self._memmaps.get(key)
        if array is None:
            if self._counts[name][split] == 0:
                array = np.zeros(0, dtype=self.dtype)
            else:
                array = np.memmap(_token_path(self.path, name, split), dtype=self.dtype, mode="r")
            self._memmaps[key] = array
            if len(self._memmaps) > _OPEN_MEMMAPS:
                self._memmaps.popitem(last=False)
        else:
            self._memmaps.move_to_end(key)
        return array

    def load_tokenizer(self):
        from fastmix.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer, self.path)

    def __repr__(self):
        return (f"DomainStore({self.path!r}, {self.num_domains} domains, {len(self.targets)} targets, "
                f"{int(self.train_tokens.sum())} train tokens, vocab {self.vocab_size})")


def cache_dir():
    """Where fastmix caches what it can rebuild: $FASTMIX_CACHE, else $XDG_CACHE_HOME/fastmix."""
    return os.environ.get("FASTMIX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fastmix")


def check_output(out, overwrite):
    """Refuse to write a store at `out` when something is there, unless overwrite is set and
    it is a fastmix store: --force must never delete a directory of the user's own data."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite/--force to replace it)")
    try:
        with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
            is_store = json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_store = False
    if not is_store:
        raise FileExistsError(f"{out} exists and is not a fastmix store: refusing to replace it "
                              f"(overwrite/--force only replaces a store; pick another OUT)")


_LOCK_SUFFIX = ".lock"


def remove_dead_temporaries(parent):
    """Removes the temporary directories (.NAME.tmp-*) that writers killed before they could
    clean up left in `parent`: those whose lock no live process holds."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(".") and ".tmp-" in name):
            continue
        if not name.endswith(_LOCK_SUFFIX):
            # a writer makes its lock before its directory and removes it after: a directory
            # without one is a dead writer's (from a fastmix before these locks), if it holds
            # nothing but a store's files
            path = os.path.join(parent, name)
            if not os.path.exists(path + _LOCK_SUFFIX) and os.path.isdir(path) and \
                    set(os.listdir(path)) <= {"tokens", "meta.json", "tokenizer.json"}:
                shutil.rmtree(path, ignore_errors=True)
            continue
        lock = DirectoryLock(parent, name, what="fastmix prepare")
        try:
            lock.acquire()
        except RunLockedError:  # a live writer's
            continue
        try:
            shutil.rmtree(os.path.join(parent, name.removesuffix(_LOCK_SUFFIX)), ignore_errors=True)
            os.remove(lock.path)
        finally:
            lock.release()


class StoreWriter:
    """Writes a store into a temporary directory next to OUT and renames it into place on
    success, so that a failure never leaves a half-written store behind. With overwrite, an
    existing store at OUT (and only a store) is replaced, and deleted once the new one is in.

        with StoreWriter(out, tokenizer_spec) as w:
            w.add("code", train_tokens, val_tokens)
            w.add("qa", train_tokens, val_tokens, target=True)
    """

    def __init__(self, out, tokenizer_spec, overwrite=False, relations=None, extra_meta=None):
        self.out = os.path.abspath(out)
        check_output(self.out, overwrite)
        self.overwrite = overwrite
        self.tokenizer_spec = dict(tokenizer_spec)
        self.vocab_size = int(tokenizer_spec["vocab_size"])
        self.dtype = token_dtype(self.vocab_size)
        self.relations = relations or {}
        self.extra_meta = extra_meta or {}
        self.domains, self.targets, self.counts = [], [], {}
        parent = os.path.dirname(self.out)
        os.makedirs(parent, exist_ok=True)
        remove_dead_temporaries(parent)
        # The temporary directory's lock, beside it, is held while this writer lives: a later
        # writer into the same parent removes the directory once its writer is gone (killed).
        fd, lock_path = tempfile.mkstemp(prefix=f".{os.path.basename(self.out)}.tmp-", suffix=_LOCK_SUFFIX,
                                         dir=parent)
        os.close(fd)
        self.lock = DirectoryLock(parent, os.path.basename(lock_path), what="fastmix prepare").acquire()
        self.tmp = lock_path.removesuffix(_LOCK_SUFFIX)
        os.mkdir(self.tmp, 0o777)  # as umask allows, like any directory the user makes (mkdtemp: 0700)
        os.makedirs(os.path.join(self.tmp, "tokens"))

    def add(self, name, train, val, target=False):
        """Add a domain (or target task) from its train and val token arrays."""
        for split, tokens in zip(SPLITS, (train, val)):
            tokens = np.asarray(tokens)
            if tokens.size:
                # The cast to the store's unsigned dtype would silently turn these into other tokens.
                if not np.issubdtype(tokens.dtype, np.integer):
                    raise ValueError(f"{name}: {split} token ids must be integers, got dtype {tokens.dtype}")
                if int(tokens.min()) < 0:
                    raise ValueError(f"{name}: negative {split} token id {int(tokens.min())}")
                if int(tokens.max()) >= self.vocab_size:
                    raise ValueError(f"{name}: token id {int(tokens.max())} >= vocab size {self.vocab_size}")
            tokens.astype(self.dtype, copy=False).tofile(self.token_path(name, split))
        self.register(name, np.asarray(train).size, np.asarray(val).size, target)

    def token_path(self, name, split):
        """Where to write a split's tokens (for writers that stream them); then `register` it."""
        if not _NAME.match(name):
            raise ValueError(f"domain name {name!r}: use letters, digits and _ . + - only")
        return _token_path(self.tmp, name, split)

    def register(self, name, train_tokens, val_tokens, target=False):
        if name in self.counts:
            raise ValueError(f"duplicate domain or target name {name!r}")
        self.counts[name] = {"train": int(train_tokens), "val": int(val_tokens)}
        (self.targets if target else self.domains).append(name)

    def commit(self):
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer_spec,
            "domains": self.domains,
            "targets": self.targets,
            "tokens": self.counts,
            "relations": self.relations,
            **self.extra_meta,
        }
        with open(os.path.join(self.tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        check_output(self.out, self.overwrite)  # again: OUT may have appeared while we wrote
        if not os.path.lexists(self.out):
            os.rename(self.tmp, self.out)
            return
        # Move the old store aside before the new one goes in, so that a failure keeps one of them.
        aside = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.old-", dir=os.path.dirname(self.out))
        old = os.path.join(aside, "store")
        os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            os.rename(old, self.out)
            os.rmdir(aside)
            raise
        shutil.rmtree(aside)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.lock.path)
        self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise
        self._unlock()
        return False
