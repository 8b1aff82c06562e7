"""`fastmix prepare`: build a DomainStore from text files, directories of them, or .jsonl.

One document is a text file, or one line of a .jsonl file (its `text_field`). Documents are
tokenized in parallel worker processes, each followed by the end-of-document token, streamed
to the domain's token file, and the last `val_fraction` of each domain's tokens is held out.
"""
import codecs
import errno
import json
import math
import multiprocessing
import os
import signal
import stat
import sys
import warnings
from collections import Counter
from collections.abc import Mapping

import numpy as np
from tqdm import tqdm

from fastmix.data.corpus import build_builtin
from fastmix.data.store import DomainStore, StoreWriter, cache_dir, check_output, token_dtype
from fastmix.data.tokenizer import BPETokenizer, ByteTokenizer
from fastmix.rundir import writing

BUILTIN_VERSION = 2  # bumped whenever a generator changes: the cache is keyed by it
_CHUNK_BYTES = 8 << 20  # .jsonl files are split into chunks of whole lines this large
# Read as text these would be tokenized as their compressed bytes.
_COMPRESSED = (".gz", ".tgz", ".bz2", ".xz", ".lzma", ".zst", ".lz4", ".zip", ".7z")


def list_files(path, encoding="utf-8"):
    """The text files to read: `path` itself, or every non-hidden regular file under a directory
    (sorted, recursively), and a FileSummary of what was left out: FIFOs, devices and sockets
    (skipped with a warning: reading them could block forever) and files that look binary (a
    NUL byte in their first 8 KiB, unless the encoding is UTF-16 or UTF-32). A symlink loop, a
    broken symlink or an unreadable file is an error naming the path."""
    summary = FileSummary()
    if os.path.isdir(path):
        candidates = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            candidates += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
    elif os.path.lexists(path):
        candidates = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = []
    for file in candidates:
        if file.lower().endswith(_COMPRESSED):
            raise ValueError(f"{file}: compressed files are not read; decompress it first")
        kind = _file_kind(file)
        if kind != "regular":
            if file == path:
                raise ValueError(f"{path}: not a regular file or directory (a {kind}): give a text file, "
                                 ".jsonl or directory")
            warnings.warn(f"{file}: skipped, a {kind} is not a regular file", stacklevel=2)
            summary.special.append(file)
        elif _looks_binary(file, encoding):
            summary.binary.append(file)
        else:
            files.append(file)
    if not files:
        raise FileNotFoundError(f"{path}: no text files to read{summary.describe(' (', ')')}")
    return files, summary


class FileSummary:
    """The inputs `prepare` did not read, or read with replaced characters."""

    def __init__(self):
        self.special, self.binary, self.replaced = [], [], {}

    def update(self, other):
        self.special += other.special
        self.binary += other.binary
        for path, count in other.replaced.items():
            self.replaced[path] = self.replaced.get(path, 0) + count

    def describe(self, before="", after=""):
        parts = []
        if self.binary:
            parts.append(f"skipped {len(self.binary)} binary file{'s' * (len(self.binary) > 1)} "
                         f"(first: {self.binary[0]})")
        if self.special:
            parts.append(f"skipped {len(self.special)} FIFO, device or socket file"
                         f"{'s' * (len(self.special) > 1)} (first: {self.special[0]})")
        if self.replaced:
            first = next(iter(self.replaced))
            parts.append(f"replaced {sum(self.replaced.values())} characters that did not decode with "
                         f"U+FFFD in {len(self.replaced)} file{'s' * (len(self.replaced) > 1)} (first: {first}; "
                         "--encoding names the files' encoding)")
        return f"{before}{'; '.join(parts)}{after}" if parts else ""

    def as_meta(self):
        return {"binary_files_skipped": len(self.binary), "special_files_skipped": len(self.special),
                "replaced_characters": sum(self.replaced.values())}


def _file_kind(file):
    try:
        mode = os.stat(file).st_mode  # follows symlinks
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{file}: symlink loop (the link leads back to itself): remove it or point it "
                             "at a file") from None
        if error.errno == errno.ENOENT and os.path.islink(file):
            raise ValueError(f"{file}: broken symlink (it points to {os.readlink(file)!r}, which does not "
                             "exist)") from None
        raise ValueError(f"{file}: cannot be read ({error.strerror})") from None
    if stat.S_ISREG(mode):
        return "regular"
    return {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
            stat.S_IFSOCK: "socket", stat.S_IFDIR: "directory"}.get(stat.S_IFMT(mode), "special file")


def _looks_binary(file, encoding):
    try:
        with open(file, "rb") as f:
            head = f.read(8192)
    except OSError as error:
        raise ValueError(f"{file}: cannot be read ({error.strerror})") from None
    return b"\0" in head and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def _is_jsonl(path):
    return path.lower().endswith(".jsonl")


def _chunks(path):
    """(path, start, end) byte ranges: whole text files, or .jsonl split at line boundaries."""
    size = os.path.getsize(path)
    if not _is_jsonl(path) or size <= _CHUNK_BYTES:
        return [(path, 0, size)]
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(start + _CHUNK_BYTES, size))
            f.readline()
            end = min(f.tell(), size)
            ranges.append((path, start, end))
            start = end
    return ranges


def _documents(path, start, end, text_field, encoding="utf-8"):
    """(the documents of a chunk, the number of characters replaced by U+FFFD in decoding it)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror})") from None
    # utf-8-sig drops a byte-order mark, which can only be at the start of the file.
    encoding = "utf-8-sig" if start == 0 and codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        text, replaced = data.decode(encoding), 0
    except UnicodeDecodeError:
        text = data.decode(encoding, errors="replace")
        # what the file held as U+FFFD itself is not a replacement
        replaced = text.count("\ufffd") - data.decode(encoding, errors="ignore").count("\ufffd")
    if not _is_jsonl(path):
        return [text], replaced
    return list(_records(path, start, text, text_field)), replaced


def _records(path, start, data, text_field):
    # "\n" only: str.splitlines() would also split at U+2028 and the like, which JSON
    # written with ensure_ascii=False carries raw inside strings.
    for i, line in enumerate(data.split("\n")):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{_where(path, start, i)}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{_where(path, start, i)}: no field {text_field!r} "
                             f"(use --text-field to name the field that holds the text)")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{_where(path, start, i)}: field {text_field!r} is "
                             f"{json.dumps(text)[:40]}, not a string")
        yield text


def read_documents(path, text_field="text", encoding="utf-8"):
    """Every document under `path` (a file, a .jsonl file or a directory), one at a time (the
    files `list_files` reads, decoded as `prepare` decodes them)."""
    for file in list_files(path, encoding)[0]:
        for chunk in _chunks(file):
            yield from _documents(*chunk, text_field, encoding)[0]


def _where(path, start, line_in_chunk):
    """"path, line N" for a line of the chunk that starts at byte `start` (for errors only:
    it counts the lines of the file before the chunk)."""
    lines_before = 0
    with open(path, "rb") as f:
        while f.tell() < start:
            block = f.read(min(1 << 20, start - f.tell()))
            if not block:
                break
            lines_before += block.count(b"\n")
    return f"{path}, line {lines_before + line_in_chunk + 1}"


def _encode_chunk(task):
    """(tokens, characters of text, characters replaced in decoding) of one chunk."""
    tokenizer, (path, start, end), text_field, encoding = task
    docs, replaced = _documents(path, start, end, text_field, encoding)
    parts = []
    for doc in docs:
        parts.append(tokenizer.encode(doc))
        if tokenizer.eos_id is not None:
            parts.append(np.array([tokenizer.eos_id], dtype=np.uint32))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return tokens, sum(len(doc) for doc in docs), replaced


def _worker_init(parent):
    """A worker dies with the process that started it (Linux), and leaves Ctrl-C to it: the
    parent stops the pool, and no worker is left orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _make_tokenizer(tokenizer, sources, text_field, bpe_vocab_size, encoding):
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "bpe":
        texts = (doc for _, paths in sources for p in paths for c in _chunks(p)
                 for doc in _documents(*c, text_field, encoding)[0])
        return BPETokenizer.train(texts, bpe_vocab_size)
    return BPETokenizer.from_file(os.fspath(tokenizer))


def prepare(out, domains, targets=(), tokenizer="byte", bpe_vocab_size=4096, text_field="text",
            val_fraction=0.05, workers=None, overwrite=False, quiet=False, encoding="utf-8"):
    """Build a store at `out`.

    domains, targets: (name, path) pairs (or dicts name -> path); path is a text file, a
    .jsonl file or a directory. tokenizer: "byte" (default), "bpe" (trained here on the
    data, needs `tokenizers`) or the path of a tokenizer.json file. encoding: of the text
    files; bytes that do not decode become U+FFFD and are counted. Files that look binary,
    FIFOs, devices and sockets are skipped; what was skipped or replaced is warned about once
    and counted in meta.json's "prepare" entry. A domain without text is refused.
    """
    named = [(n, os.fspath(p), False) for n, p in _pairs(domains)] + \
        [(n, os.fspath(p), True) for n, p in _pairs(targets)]
    if not named:
        raise ValueError("give at least one domain (NAME=PATH)")
    repeated = [name for name, count in Counter(name for name, _, _ in named).items() if count > 1]
    if repeated:
        raise ValueError(f"name {repeated[0]!r} is given more than once (domains and targets "
                         f"need distinct names)")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if tokenizer not in ("byte", "bpe") and not os.path.isfile(tokenizer):
        raise ValueError(f"--tokenizer {os.fspath(tokenizer)!r}: expected byte, bpe or a tokenizer.json FILE, "
                         "and there is no such file")
    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise ValueError(f"--encoding {encoding!r} is not a text encoding Python knows (utf-8, latin-1, "
                         "cp1252, utf-16, ...)") from None
    check_output(os.path.abspath(out), overwrite)  # before hours of tokenizing, not after
    summary, sources = FileSummary(), []
    for name, path, is_target in named:
        try:
            files, skipped = list_files(path, encoding)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{'target' if is_target else 'domain'} {name!r}: {error}") from None
        sources.append((name, files))
        summary.update(skipped)
    tok = _make_tokenizer(tokenizer, sources, text_field, bpe_vocab_size, encoding)
    workers = workers or min(os.cpu_count() or 1, 8)
    tasks = [(i, c) for i, (_, paths) in enumerate(sources) for p in paths for c in _chunks(p)]
    total_bytes = sum(end - start for _, (_, start, end) in tasks)
    dtype = token_dtype(tok.vocab_size)

    with writing(out, f"Nothing was written to {out} (a store is moved into place only when whole)",
                 "run the same `fastmix prepare` again"), StoreWriter(out, tok.spec(), overwrite=overwrite) as writer:
        if isinstance(tok, BPETokenizer):
            tok.save(writer.tmp)
        files = [open(writer.token_path(name, "train"), "wb") for name, _, _ in named]
        counts, characters = [0] * len(named), [0] * len(named)
        try:
            # fork keeps workers cheap to start; results arrive in order, so output is deterministic.
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            if workers > 1 and len(tasks) > 1:
                # forked with Ctrl-C ignored: one arriving before a worker's initializer ran would
                # print its traceback; the parent stops the workers itself
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    pool = ctx.Pool(workers, _worker_init, (os.getpid(),))
                finally:
                    signal.signal(signal.SIGINT, previous)
            else:
                pool = _InlinePool()
            with pool, tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=quiet) as bar:
                work = ((tok, chunk, text_field, encoding) for _, chunk in tasks)
                for (domain, (path, start, end)), (tokens, chars, replaced) in zip(tasks,
                                                                                   pool.imap(_encode_chunk, work)):
                    tokens.astype(dtype).tofile(files[domain])
                    counts[domain] += tokens.size
                    characters[domain] += chars
                    if replaced:
                        summary.replaced[path] = summary.replaced.get(path, 0) + replaced
                    bar.update(end - start)
        finally:
            for f in files:
                f.close()
        for (name, path, is_target), n, chars in zip(named, counts, characters):
            if chars == 0:
                raise ValueError(f"{'target' if is_target else 'domain'} {name!r} ({path}) holds no text: "
                                 "its files are empty (a domain needs tokens to train on)")
            n_val = split_off_val(writer, name, n, dtype, val_fraction)
            writer.register(name, n - n_val, n_val, target=is_target)
        writer.extra_meta["prepare"] = {"encoding": encoding, **summary.as_meta()}
    if summary.describe():
        warnings.warn(f"fastmix prepare: {summary.describe()}", stacklevel=2)
    return DomainStore(out)


def _pairs(names_to_paths):
    """(name, path) pairs from a dict or a sequence of pairs (which may repeat a name)."""
    return list(names_to_paths.items()) if isinstance(names_to_paths, Mapping) else list(names_to_paths)


def split_off_val(writer, name, n, dtype, val_fraction):
    """Move the last val_fraction of a domain's tokens from its train file to its val file."""
    n_val = math.ceil(n * val_fraction)
    train_path = writer.token_path(name, "train")
    tail = np.fromfile(train_path, dtype=dtype, offset=(n - n_val) * dtype.itemsize)
    tail.tofile(writer.token_path(name, "val"))
    os.truncate(train_path, (n - n_val) * dtype.itemsize)
    return n_val


class _InlinePool:
    """Stands in for a process pool when one worker is enough."""

    def imap(self, fn, items):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def builtin_store(seed=0):
    """The built-in corpus for `seed`, built once into the cache directory ($FASTMIX_CACHE)."""
    path = os.path.join(cache_dir(), f"builtin-v{BUILTIN_VERSION}-seed{seed}")
    if not os.path.exists(path):
        try:
            build_builtin(path, seed=seed)
        except (FileExistsError, OSError):
            if not os.path.exists(path):  # not a concurrent build of the same store: a real error
                raise
    return DomainStore(path)
