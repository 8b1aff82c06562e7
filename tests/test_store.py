import json
import os

import numpy as np
import pytest

from fastmix.data import DomainStore, StoreError, StoreWriter


def _write(path, vocab_size=257, **kw):
    rng = np.random.default_rng(1)
    arrays = {name: (rng.integers(0, vocab_size, n), rng.integers(0, vocab_size, n // 10))
              for name, n in (("a", 1000), ("b", 250), ("t", 300))}
    with StoreWriter(path, {"type": "byte", "vocab_size": vocab_size}, **kw) as w:
        w.add("a", *arrays["a"])
        w.add("b", *arrays["b"])
        w.add("t", *arrays["t"], target=True)
    return arrays


@pytest.mark.parametrize("vocab_size, dtype", [(257, np.uint16), (70_000, np.uint32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    arrays = _write(tmp_path / "s", vocab_size)
    store = DomainStore(tmp_path / "s")
    assert store.domains == ["a", "b"] and store.targets == ["t"]
    assert store.dtype == dtype and store.vocab_size == vocab_size
    assert store.train_tokens.tolist() == [1000, 250]
    for name, (train, val) in arrays.items():
        np.testing.assert_array_equal(store.tokens(name, "train"), train)
        np.testing.assert_array_equal(store.tokens(name, "val"), val)
    np.testing.assert_array_equal(store.tokens(1), arrays["b"][0])  # by domain index


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="vocab size"):
        with StoreWriter(tmp_path / "s", {"type": "byte", "vocab_size": 10}) as w:
            w.add("a", np.arange(5), np.arange(2))
            w.add("b", np.arange(50), np.arange(2))  # token ids >= vocab size
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    _write(tmp_path / "s")
    with pytest.raises(FileExistsError, match="already exists"):
        _write(tmp_path / "s")
    _write(tmp_path / "s", overwrite=True)
    DomainStore(tmp_path / "s")


def test_bad_names_rejected(tmp_path):
    with StoreWriter(tmp_path / "s", {"type": "byte", "vocab_size": 257}) as w:
        with pytest.raises(ValueError, match="name"):
            w.add("../evil", np.arange(5), np.arange(2))
        w.add("ok", np.arange(5), np.arange(2))
        with pytest.raises(ValueError, match="duplicate"):
            w.add("ok", np.arange(5), np.arange(2))


def _corrupt(path, how):
    meta_path = path / "meta.json"
    if how == "truncated":
        f = path / "tokens" / "a.train.bin"
        f.write_bytes(f.read_bytes()[:-7])
    elif how == "missing token file":
        os.remove(path / "tokens" / "b.val.bin")
    elif how == "missing meta":
        os.remove(meta_path)
    elif how == "bad json":
        meta_path.write_text(meta_path.read_text()[:-20])
    else:
        meta = json.loads(meta_path.read_text())
        if how == "version":
            meta["version"] = 99
        elif how == "missing key":
            del meta["tokens"]
        elif how == "format":
            meta["format"] = "something-else"
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated"), ("missing token file", "missing"), ("missing meta", "meta.json is missing"),
    ("bad json", "corrupt meta.json"), ("version", "version 99"), ("missing key", "corrupt meta.json"),
    ("format", "not a fastmix store"),
])
def test_corrupt_store_gives_clear_error(tmp_path, how, message):
    _write(tmp_path / "s")
    _corrupt(tmp_path / "s", how)
    with pytest.raises(StoreError, match=message):
        DomainStore(tmp_path / "s")


def test_missing_directory(tmp_path):
    with pytest.raises(StoreError, match="fastmix prepare"):
        DomainStore(tmp_path / "nope")


def test_jsonl_text_may_hold_unicode_line_separators(tmp_path):
    """Only "\\n" ends a .jsonl record: U+2028 and friends are legal raw inside JSON strings."""
    import json

    from fastmix.data import DomainStore
    from fastmix.data.prepare import prepare

    texts = ["one\u2028two", "three\x1cfour\u0085five"]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n", encoding="utf-8")
    prepare(tmp_path / "store", {"d": path}, val_fraction=0.0, quiet=True)
    assert DomainStore(tmp_path / "store").num_tokens("d") > 0


def test_overwrite_replaces_only_a_store(tmp_path):
    """--force must not delete a directory that is not a fastmix store (it may be the user's data)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=f"{data}.*not a fastmix store"):
        _write(data, overwrite=True)
    assert (data / "thesis.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no temporary left behind

    _write(tmp_path / "s", vocab_size=300)
    _write(tmp_path / "s", overwrite=True)
    assert DomainStore(tmp_path / "s").vocab_size == 257
    assert sorted(os.listdir(tmp_path)) == ["data", "s"]  # the old store is deleted


def test_failed_replace_keeps_the_old_store(tmp_path, monkeypatch):
    _write(tmp_path / "s", vocab_size=300)
    rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in os.fspath(src):  # moving the new store in
            raise OSError("disk trouble")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk trouble"):
        _write(tmp_path / "s", overwrite=True)
    monkeypatch.undo()
    assert DomainStore(tmp_path / "s").vocab_size == 300
    assert os.listdir(tmp_path) == ["s"]


def test_failed_commit_leaves_no_temporary(tmp_path):
    """Two writers of the same store (two processes building the built-in cache): the second
    commit fails, and must not leave its temporary directory behind."""
    spec = {"type": "byte", "vocab_size": 257}
    first, second = StoreWriter(tmp_path / "s", spec), StoreWriter(tmp_path / "s", spec)
    with first:
        first.add("a", np.arange(20), np.arange(5))
    with pytest.raises(FileExistsError, match="already exists"):
        with second:
            second.add("a", np.arange(20), np.arange(5))
    assert os.listdir(tmp_path) == ["s"]


@pytest.mark.parametrize("tokens, message", [
    (np.array([3, -1, 5]), "a: negative train token id -1"),
    (np.array([3.0, 200.7]), "a: train token ids must be integers"),
])
def test_negative_or_float_token_ids_rejected(tmp_path, tokens, message):
    with pytest.raises(ValueError, match=message):
        with StoreWriter(tmp_path / "s", {"type": "byte", "vocab_size": 257}) as w:
            w.add("a", tokens, np.arange(3))
    assert os.listdir(tmp_path) == []


def _poke_token(path, value):
    """Overwrites one token of a token file in place, keeping its size (as a bad writer or a
    damaged disk would); returns the file's (atime, mtime) from before."""
    stat = os.stat(path)
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[len(tokens) // 2] = value
    tokens.tofile(path)
    return stat.st_atime_ns, stat.st_mtime_ns


def test_token_ids_at_or_above_the_vocabulary_are_refused_at_open(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMIX_CACHE", str(tmp_path / "cache"))
    _write(tmp_path / "s")
    DomainStore(tmp_path / "s")  # validated once, then cached
    path = tmp_path / "s" / "tokens" / "b.train.bin"
    times = _poke_token(path, 257)
    os.utime(path, ns=times)  # the same size and mtime: the cached result stands (opening stays fast)
    DomainStore(tmp_path / "s")
    os.utime(path, ns=(times[0], times[1] + 1000))  # the file changed: read again
    with pytest.raises(StoreError, match=f"^{path}: token id 257 >= the store's vocab_size 257"):
        DomainStore(tmp_path / "s")


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache directory would be")
    monkeypatch.setenv("FASTMIX_CACHE", str(tmp_path / "cache"))
    _write(tmp_path / "s")
    _poke_token(tmp_path / "s" / "tokens" / "a.val.bin", 300)
    with pytest.raises(StoreError, match="token id 300 >= the store's vocab_size 257"):
        DomainStore(tmp_path / "s")


def test_duplicate_domain_names_in_meta_are_refused(tmp_path):
    _write(tmp_path / "s")
    meta_path = tmp_path / "s" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["domains"] = ["a", "a"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="the name 'a' is listed more than once"):
        DomainStore(tmp_path / "s")
