"""`fastmix prepare`: build a DomainStore from text files, directories of them, or .jsonl.

One document is a text file, or one line of a .jsonl file (its `text_field`). Documents are
tokenized in parallel worker processes, each followed by the end-of-document token, streamed
to the domain's token file, and the last `val_fraction` of each domain's tokens is held out.
"""
import json
import math
import multiprocessing
import os
from collections import Counter
from collections.abc import Mapping

import numpy as np
from tqdm import tqdm

from fastmix.data.corpus import build_builtin
from fastmix.data.store import DomainStore, StoreWriter, cache_dir, check_output, token_dtype
from fastmix.data.tokenizer import BPETokenizer, ByteTokenizer

BUILTIN_VERSION = 2  # bumped whenever a generator changes: the cache is keyed by it
_CHUNK_BYTES = 8 << 20  # .jsonl files are split into chunks of whole lines this large
# Read as text these would be tokenized as their compressed bytes.
_COMPRESSED = (".gz", ".tgz", ".bz2", ".xz", ".lzma", ".zst", ".lz4", ".zip", ".7z")


def list_files(path):
    """A file, or every non-hidden file under a directory (sorted, recursively)."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")]
        if not files:
            raise FileNotFoundError(f"{path}: directory has no files")
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    for file in files:
        if file.lower().endswith(_COMPRESSED):
            raise ValueError(f"{file}: compressed files are not read; decompress it first")
    return files


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


def _documents(path, start, end, text_field):
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    # utf-8-sig drops a byte-order mark, which can only be at the start of the file.
    data = data.decode("utf-8-sig" if start == 0 else "utf-8", errors="replace")
    if not _is_jsonl(path):
        yield data
        return
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


def read_documents(path, text_field="text"):
    """Every document under `path` (a file, a .jsonl file or a directory), one at a time."""
    for file in list_files(path):
        for chunk in _chunks(file):
            yield from _documents(*chunk, text_field)


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
    tokenizer, (path, start, end), text_field = task
    parts = []
    for doc in _documents(path, start, end, text_field):
        parts.append(tokenizer.encode(doc))
        if tokenizer.eos_id is not None:
            parts.append(np.array([tokenizer.eos_id], dtype=np.uint32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)


def _make_tokenizer(tokenizer, sources, text_field, bpe_vocab_size):
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "bpe":
        texts = (doc for _, paths in sources for p in paths for c in _chunks(p) for doc in _documents(*c, text_field))
        return BPETokenizer.train(texts, bpe_vocab_size)
    return BPETokenizer.from_file(os.fspath(tokenizer))


def prepare(out, domains, targets=(), tokenizer="byte", bpe_vocab_size=4096, text_field="text",
            val_fraction=0.05, workers=None, overwrite=False, quiet=False):
    """Build a store at `out`.

    domains, targets: (name, path) pairs (or dicts name -> path); path is a text file, a
    .jsonl file or a directory. tokenizer: "byte" (default), "bpe" (trained here on the
    data, needs `tokenizers`) or the path of a tokenizer.json file.
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
    check_output(os.path.abspath(out), overwrite)  # before hours of tokenizing, not after
    sources = [(name, list_files(path)) for name, path, _ in named]
    tok = _make_tokenizer(tokenizer, sources, text_field, bpe_vocab_size)
    workers = workers or min(os.cpu_count() or 1, 8)
    tasks = [(i, c) for i, (_, paths) in enumerate(sources) for p in paths for c in _chunks(p)]
    total_bytes = sum(end - start for _, (_, start, end) in tasks)
    dtype = token_dtype(tok.vocab_size)

    with StoreWriter(out, tok.spec(), overwrite=overwrite) as writer:
        if isinstance(tok, BPETokenizer):
            tok.save(writer.tmp)
        files = [open(writer.token_path(name, "train"), "wb") for name, _, _ in named]
        counts = [0] * len(named)
        try:
            # fork keeps workers cheap to start; results arrive in order, so output is deterministic.
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            with ctx.Pool(workers) if workers > 1 and len(tasks) > 1 else _InlinePool() as pool, \
                    tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=quiet) as bar:
                work = ((tok, chunk, text_field) for _, chunk in tasks)
                for (domain, (_, start, end)), tokens in zip(tasks, pool.imap(_encode_chunk, work)):
                    tokens.astype(dtype).tofile(files[domain])
                    counts[domain] += tokens.size
                    bar.update(end - start)
        finally:
            for f in files:
                f.close()
        for (name, _, is_target), n in zip(named, counts):
            n_val = split_off_val(writer, name, n, dtype, val_fraction)
            writer.register(name, n - n_val, n_val, target=is_target)
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
