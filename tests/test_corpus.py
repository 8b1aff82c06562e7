import json
import sys

import numpy as np
import pytest

from fastmix.data import BUILTIN_DOMAINS, BUILTIN_RELATIONS, BUILTIN_TARGETS, DomainStore, build_builtin, prepare
from fastmix.data.corpus import PARTIAL_RELATIONS, generate, number_words


def test_builtin_has_domains_targets_and_known_relations():
    assert len(BUILTIN_DOMAINS) >= 8 and len(BUILTIN_TARGETS) >= 2
    for target, domains in BUILTIN_RELATIONS.items():
        assert target in BUILTIN_TARGETS
        assert domains and set(domains) <= set(BUILTIN_DOMAINS)
        assert not set(domains) & set(PARTIAL_RELATIONS[target])


def test_builtin_is_deterministic_by_seed():
    for name, gen in {**BUILTIN_DOMAINS, **BUILTIN_TARGETS}.items():
        a = generate(gen, 500, 0, name, "train")
        assert a.size == 500
        np.testing.assert_array_equal(a, generate(gen, 500, 0, name, "train"))
        assert not np.array_equal(a, generate(gen, 500, 1, name, "train"))
        assert not np.array_equal(a, generate(gen, 500, 0, name, "val"))


def test_documents_are_correct():
    text = generate(BUILTIN_DOMAINS["add_digits"], 2000, 0, "add_digits", "train").tobytes().decode()
    for line in text.split("\n")[:-1]:
        lhs, rhs = line.split("=")
        a, b = lhs.split("+")
        assert int(a) + int(b) == int(rhs)
    assert number_words(147) == "one hundred forty-seven" and number_words(20) == "twenty"


def test_build_builtin_store(tmp_path):
    build_builtin(tmp_path / "b", train_tokens=3000, val_tokens=500, target_train_tokens=400)
    store = DomainStore(tmp_path / "b")
    assert store.domains == list(BUILTIN_DOMAINS) and store.targets == list(BUILTIN_TARGETS)
    assert store.relations == BUILTIN_RELATIONS
    assert store.train_tokens.tolist() == [3000] * len(BUILTIN_DOMAINS)
    assert store.num_tokens("arith", "train") == 400
    assert store.load_tokenizer().decode(store.tokens("copy")[:6]) == "copy: "


@pytest.fixture
def sources(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "one.txt").write_text("first document\n")
    (d / "sub" / "two.txt").write_text("second document ü\n")
    (d / ".hidden").write_text("skipped")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"record {i}", "id": i}) for i in range(20)) + "\n\n")
    return d, jsonl


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_from_text_and_jsonl(tmp_path, sources, workers):
    d, jsonl = sources
    store = prepare(tmp_path / "s", {"texts": d}, {"records": jsonl}, text_field="body",
                    val_fraction=0.25, workers=workers, quiet=True)
    tok = store.load_tokenizer()
    assert store.domains == ["texts"] and store.targets == ["records"]
    texts = tok.decode(np.concatenate([store.tokens("texts", "train"), store.tokens("texts", "val")]))
    assert texts == "first document\nsecond document ü\n"
    records = np.concatenate([store.tokens("records", "train"), store.tokens("records", "val")])
    assert (records == tok.eos_id).sum() == 20
    assert tok.decode(records) == "".join(f"record {i}" for i in range(20))
    n = len(texts.encode()) + 2  # + an end-of-document token per file
    assert store.num_tokens("texts", "val") == int(np.ceil(0.25 * n))


def test_prepare_bad_jsonl_field_leaves_no_store(tmp_path, sources):
    _, jsonl = sources
    with pytest.raises(ValueError, match="--text-field"):
        prepare(tmp_path / "s", {"records": jsonl}, workers=1, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "texts"]  # no store, no temporary


def test_prepare_with_bpe(tmp_path, sources):
    pytest.importorskip("tokenizers")
    d, jsonl = sources
    store = prepare(tmp_path / "s", {"texts": d, "records": jsonl}, tokenizer="bpe", bpe_vocab_size=300,
                    text_field="body", quiet=True)
    assert store.tokenizer["type"] == "bpe" and store.vocab_size <= 300
    tok = store.load_tokenizer()
    all_tokens = np.concatenate([store.tokens("texts", "train"), store.tokens("texts", "val")])
    assert tok.decode(all_tokens).startswith("first document")
    # the saved tokenizer file can be reused for another store
    again = prepare(tmp_path / "s2", {"texts": d}, tokenizer=str(tmp_path / "s" / "tokenizer.json"), quiet=True)
    assert again.vocab_size == store.vocab_size


@pytest.mark.parametrize("domains, targets", [
    ([("a", "one.txt"), ("a", "missing")], []),
    ({"a": "one.txt"}, {"a": "missing"}),
])
def test_prepare_repeated_name_fails_before_any_work(tmp_path, domains, targets):
    """A repeated name would silently drop a source (or fail only after all the tokenizing)."""
    (tmp_path / "one.txt").write_text("text")
    at = lambda pairs: [(n, tmp_path / p) for n, p in (pairs.items() if isinstance(pairs, dict) else pairs)]
    with pytest.raises(ValueError, match="name 'a' is given more than once"):  # not: "missing" does not exist
        prepare(tmp_path / "s", at(domains), at(targets), quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt"]


@pytest.mark.parametrize("line3, message", [
    ('{"id": 3}', "no field 'text'"),
    ('{"text": null}', "field 'text' is null, not a string"),
    ('{"text": 7}', "field 'text' is 7, not a string"),
    ('["text"]', "no field 'text'"),
    ('{"text": "unterminated', "not valid JSON"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_bad_jsonl_line_is_located(tmp_path, monkeypatch, line3, message, workers):
    # fastmix.data.prepare is also the name of the function: patch the module's constant
    monkeypatch.setattr(sys.modules["fastmix.data.prepare"], "_CHUNK_BYTES", 10)  # line 3 in a later chunk
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n' + line3 + '\n{"text": "four"}\n')
    with pytest.raises(ValueError, match=f"d.jsonl, line 3: {message}"):
        prepare(tmp_path / "s", {"d": path}, workers=workers, quiet=True)


def test_prepare_skips_a_byte_order_mark_and_reads_upper_case_jsonl(tmp_path):
    path = tmp_path / "D.JSONL"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "bom"}\n{"text": "x"}\n')
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfplain")
    store = prepare(tmp_path / "s", {"d": path, "t": tmp_path / "t.txt"}, val_fraction=0.0, quiet=True)
    tok = store.load_tokenizer()
    assert tok.decode(store.tokens("d")) == "bomx"
    assert tok.decode(store.tokens("t")) == "plain"


@pytest.mark.parametrize("option, message", [
    ({"tokenizer": "BPE"}, "--tokenizer 'BPE': expected byte, bpe or a tokenizer.json FILE, and there is no such file"),
    ({"val_fraction": 1.0}, "--val-fraction must be in [0, 1), got 1.0"),
])
def test_prepare_bad_options_name_their_flag_before_any_work(tmp_path, option, message):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ValueError) as e:
        prepare(tmp_path / "s", {"a": tmp_path / "a.txt"}, quiet=True, **option)
    assert str(e.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_prepare_rejects_compressed_files(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("text")
    (d / "b.jsonl.GZ").write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(ValueError, match="b.jsonl.GZ: compressed files are not read"):
        prepare(tmp_path / "s", {"d": d}, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]
