"""`fastmix info` and `fastmix bench`: what a user runs first to see what the install gives."""
from fastmix.cli import main
from fastmix.ops import backends


def test_info_lists_versions_and_backend_per_op(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert "torch:" in out and "compiled extension:" in out
    for op in ("rowwise_bilinear", "ghost_dots", "weight_grad_dots", "batched_svd"):
        line = next(line for line in out.splitlines() if line.strip().startswith(op + ":"))
        assert line.split()[1] == backends.choose(op, "cpu")


def test_bench_times_every_backend_against_torch(capsys):
    main(["bench", "--device", "cpu", "--rows", "64", "--width", "16", "--domains", "4", "--batch", "4",
          "--min-time", "0.01"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["op", "backend", "median", "ms", "speed-up"]
    baselines = [line for line in lines if "torch (baseline)" in line]
    assert len(baselines) == 2 and all(line.endswith("1.00x") for line in baselines)
    if backends.COMPILED:
        assert sum(line.split()[0] == "cpu" for line in lines) == 2


def test_weights_from_a_checkpoint(tmp_path, capsys):
    """`fastmix weights RUN`: Chameleon weights of every domain of the store, on the simplex,
    and in finetune mode ordered as the leverage scores (inverse order in pretrain mode)."""
    import json

    from fastmix.data import DomainStore, build_builtin

    store = tmp_path / "store"
    build_builtin(store, train_tokens=3000, val_tokens=600, target_train_tokens=300)
    main(["train", "--data", str(store), "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4",
          "--block-size", "16", "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--quiet", "--no-plot"])
    results = {}
    for mode in ("pretrain", "finetune"):
        out = tmp_path / f"{mode}.json"
        main(["weights", str(tmp_path / "run"), "--data", str(store), "--mode", mode, "--windows-per-domain", "4",
              "--quiet", "--json", str(out)])
        results[mode] = json.loads(out.read_text())
    assert results["pretrain"]["domains"] == DomainStore(store).domains
    assert "leverage" in capsys.readouterr().out
    for mode, result in results.items():
        weights, scores = result["weights"], result["scores"]
        assert abs(sum(weights) - 1) < 1e-9 and min(weights) > 0
        by_score = sorted(range(len(scores)), key=scores.__getitem__)
        by_weight = sorted(range(len(weights)), key=weights.__getitem__)
        assert by_weight == (by_score if mode == "finetune" else by_score[::-1])
    # a store whose tokenizer is larger than the checkpoint model's vocabulary
    import numpy as np
    import pytest

    from fastmix.data import StoreWriter

    with StoreWriter(tmp_path / "wide", {"type": "file", "vocab_size": 5000}) as writer:
        writer.add("a", np.arange(400) % 5000, np.arange(400) % 5000)
    with pytest.raises(SystemExit) as e:
        main(["weights", str(tmp_path / "run"), "--data", str(tmp_path / "wide"), "--quiet"])
    assert e.value.code == ("fastmix weights: error: the store's tokenizer has 5000 tokens but the model's "
                            "vocabulary only 257: prepare the store with the model's own tokenizer")
