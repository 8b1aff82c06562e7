"""Chameleon from Hugging Face causal LMs: `fastmix weights --model DIR` and embed_sequences on
tiny Llama and GPT-2 models built from configs, the recipe's seeded windows, the masked mean."""
import inspect
import json
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastmix  # noqa: E402
from fastmix.cli import main  # noqa: E402
from fastmix.data import DomainStore, StoreWriter  # noqa: E402
from fastmix.data.tokenizer import ByteTokenizer  # noqa: E402
from fastmix.hidden_states import (check_store, domain_embeddings, domain_windows, embed_sequences,  # noqa: E402
                                   load_causal_lm)
from fastmix.leverage_weights import chameleon_weights  # noqa: E402

STORE_VOCAB = 120
CONTEXT = 64


def tiny_model(kind, vocab=128):
    """4 blocks, so the middle one (block 1) is not block n // 2."""
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=0)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=4, n_head=2, n_positions=CONTEXT,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def make_store(path, seed, domains=("a", "b", "c"), train=600):
    """Domains of random tokens, each from its own range of ids (so their embeddings differ)."""
    rng = np.random.default_rng(seed)
    with StoreWriter(path, {"type": "file", "vocab_size": STORE_VOCAB}) as writer:
        for i, name in enumerate(domains):
            low = 30 * (i % 3)
            writer.add(name, rng.integers(low, low + 60, train), rng.integers(low, low + 60, 50))
    return DomainStore(path)


def saved_model(tmp_path, kind, vocab=128):
    directory = tmp_path / f"{kind}-model"
    tiny_model(kind, vocab).save_pretrained(directory)
    return str(directory)


def _error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str), e.value.code
    return e.value.code


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_weights_of_a_saved_model_are_the_recipe_on_its_middle_hidden_states(tmp_path, seed, kind):
    store = make_store(tmp_path / "store", seed)
    directory = saved_model(tmp_path, kind)
    out = tmp_path / "weights.json"
    main(["weights", "--model", directory, "--data", store.path, "--windows-per-domain", "6", "--window-length",
          "24", "--seed", str(seed), "--batch-size", "6", "--quiet", "--json", str(out)])
    result = json.loads(out.read_text())
    # by hand: the same model, the same windows, hidden_states[2] = block 1's output, mean over tokens, windows
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    rows = []
    with torch.no_grad():
        for name in store.domains:
            windows = domain_windows(store, name, 6, 24, seed)
            states = model(input_ids=windows, output_hidden_states=True).hidden_states
            assert len(states) == 5
            rows.append(states[2].mean(1).sum(0) / 6)
    weights, scores = chameleon_weights(torch.stack(rows).double(), return_scores=True)
    assert result["domains"] == ["a", "b", "c"]
    assert result["weights"] == weights.tolist() and result["scores"] == scores.tolist()
    # the in-memory model gives the same embeddings as the directory
    again = domain_embeddings(model, store, windows_per_domain=6, window_length=24, batch_size=6, seed=seed,
                              progress=False)
    assert torch.equal(again, torch.stack(rows))


def test_windows_are_seeded_slices_of_the_training_split(tmp_path, seed):
    store = make_store(tmp_path / "store", seed)
    first = domain_windows(store, "b", 5, 16, seed=seed)
    assert first.shape == (5, 16) and first.dtype == torch.int64
    assert torch.equal(domain_windows(store, "b", 5, 16, seed=seed), first)
    assert not torch.equal(domain_windows(store, "b", 5, 16, seed=seed + 1), first)
    train = torch.from_numpy(store.tokens("b", "train").astype(np.int64))
    slices = train.unfold(0, 16, 1)  # every window of the training split
    for row in first:
        assert bool((slices == row).all(1).any())
    # a domain's windows depend on its name and the seed only: adding a domain changes nothing
    grown = make_store(tmp_path / "grown", seed, domains=("a", "b", "c", "d"))
    assert torch.equal(domain_windows(grown, "b", 5, 16, seed=seed), first)
    # the published recipe by default: 2048 windows of 512 tokens (shorter for a shorter context)
    for function, count, length in [(domain_windows, "count", "length"),
                                    (domain_embeddings, "windows_per_domain", "window_length")]:
        parameters = inspect.signature(function).parameters
        assert parameters[count].default == 2048
    assert inspect.signature(domain_windows).parameters["length"].default == 512
    assert check_store(tiny_model("gpt2"), store) == CONTEXT
    long_model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=128, n_embd=8, n_layer=1, n_head=2,
                                                                      n_positions=1024))
    assert check_store(long_model, store) == 512


def test_cli_help_gives_the_recipe_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["weights", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 2048)" in text and "(default 512, or the model's context when shorter)" in text


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_padding_does_not_change_the_embedding(seed, kind):
    model = tiny_model(kind)
    sequences = [torch.randint(0, 128, (n,)) for n in (7, 3, 12, 1)]
    together = embed_sequences(model, sequences, batch_size=4)
    alone = torch.cat([embed_sequences(model, [s]) for s in sequences])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want = model(input_ids=sequences[2][None], output_hidden_states=True).hidden_states[2].mean(1)
    torch.testing.assert_close(alone[2:3], want, rtol=1e-6, atol=1e-7)
    # a batch padded by the caller (random ids at the padded positions) with its attention mask
    padded = torch.randint(0, 128, (4, 12))
    mask = torch.zeros(4, 12, dtype=torch.bool)
    for i, s in enumerate(sequences):
        padded[i, :len(s)], mask[i, :len(s)] = s, True
    embedded = domain_embeddings(model, [[(padded, mask)]], progress=False)
    torch.testing.assert_close(embedded[0], alone.mean(0), rtol=1e-5, atol=1e-6)
    # padded on the left, the attention mask keeps the padded ids out of the valid positions' states
    left = [torch.randint(0, 128, (4, 12)) for _ in range(2)]
    for batch in left:
        for i, s in enumerate(sequences):
            batch[i, 12 - len(s):] = s
    mask = mask.flip(1)
    first, second = (domain_embeddings(model, [[(batch, mask)]], progress=False) for batch in left)
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)
    # the middle block's output read by a hook is the same hidden state
    block = "model.layers.1" if kind == "llama" else "transformer.h.1"
    torch.testing.assert_close(embed_sequences(model, sequences, layer=block), together, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(embed_sequences(model, sequences, layer=1), together, rtol=0, atol=0)
    assert fastmix.embed_sequences is embed_sequences


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_head_runs_only_when_it_is_the_layer(seed, kind):
    model = tiny_model(kind)
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    ids = torch.randint(0, 128, (2, 5))
    embed_sequences(model, ids)  # the middle block's states: the backbone alone, no logits
    embed_sequences(model, ids, layer=2)
    assert calls == []
    logits = embed_sequences(model, ids, layer="lm_head")
    assert calls == [(2, 5, 128)]
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=ids).logits.mean(1))


def test_embed_sequences_of_texts_and_long_documents(seed):
    model = tiny_model("gpt2", vocab=257)
    tokenizer = ByteTokenizer()
    texts = ["the cat sat", "x" * 100]
    by_text = embed_sequences(model, texts, tokenizer=tokenizer)
    ids = [tokenizer.encode(t) for t in texts]
    by_ids = embed_sequences(model, [ids[0], ids[1][:CONTEXT]])  # a document keeps its first context tokens
    torch.testing.assert_close(by_text, by_ids, rtol=0, atol=0)
    assert by_text.shape == (2, 16) and by_text.dtype == torch.float32
    short = embed_sequences(model, [ids[1]], max_length=10)
    torch.testing.assert_close(short, embed_sequences(model, [ids[1][:10]]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass tokenizer="):
        embed_sequences(model, texts)
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        embed_sequences(model, [ids[0], []])


def test_load_causal_lm_of_a_saved_model(tmp_path, seed):
    directory = saved_model(tmp_path, "llama")
    model = load_causal_lm(directory)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(embed_sequences(model, ids), embed_sequences(load_causal_lm(directory), ids))


def test_bad_inputs_end_in_one_line(tmp_path, seed, monkeypatch):
    store = make_store(tmp_path / "store", seed)
    directory = saved_model(tmp_path, "gpt2")
    base = ["weights", "--data", store.path, "--windows-per-domain", "2", "--quiet"]
    missing = tmp_path / "nothing"
    assert _error([*base, "--model", str(missing)]) == f"fastmix weights: error: --model {missing}: no such directory"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _error([*base, "--model", str(empty)]) == (
        f"fastmix weights: error: --model {empty}: no config.json, so not a Hugging Face model directory "
        "(save one there with save_pretrained)")
    vit = tmp_path / "vit"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=8, image_size=8, patch_size=4)).save_pretrained(vit)
    assert _error([*base, "--model", str(vit)]) == (
        f"fastmix weights: error: --model {vit}: a 'vit' model, which is not a causal language model "
        "(AutoModelForCausalLM cannot load it)")
    small = saved_model(tmp_path, "llama", vocab=100)
    assert _error([*base, "--model", small]) == (
        f"fastmix weights: error: the store's tokenizer has {STORE_VOCAB} tokens but the model's vocabulary only "
        "100: prepare the store with the model's own tokenizer")
    assert _error([*base, "--model", directory, "--window-length", "65"]) == (
        "fastmix weights: error: windows of 65 tokens are longer than the model's context of 64")
    short = make_store(tmp_path / "short", seed, train=40)
    assert _error(["weights", "--data", short.path, "--model", directory]) == (
        "fastmix weights: error: domain 'a' has 40 training tokens, fewer than one window of 64: give shorter windows")
    assert _error(["weights", "--model", directory]) == (
        "fastmix weights: error: --model needs --data: the store whose domains to weigh (prepared with the "
        "model's tokenizer)")
    assert _error(["weights"]) == ("fastmix weights: error: give a checkpoint (a run directory of `fastmix train`) "
                                   "or --model DIR (a Hugging Face causal LM)")
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        main([*base, "--model", directory, "--windows-per-domain", "0"])
    assert e.value.code == 2
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert _error([*base, "--model", directory]) == (
        "fastmix weights: error: --model: a Hugging Face model needs the transformers package: "
        "pip install transformers")


def test_a_store_prepared_with_the_models_tokenizer_file(tmp_path, seed):
    """The documented path: `fastmix prepare --tokenizer tokenizer.json` (the model's file), then
    `fastmix weights --model DIR --data STORE`."""
    tokenizers = pytest.importorskip("tokenizers")
    rng = np.random.default_rng(seed)
    words = {"animals": ["cat", "dog", "owl", "fox"], "numbers": ["one", "two", "six", "ten"],
             "colors": ["red", "tan", "blue", "gold"]}
    for name, vocabulary in words.items():
        (tmp_path / f"{name}.txt").write_text(" ".join(rng.choice(vocabulary, 600)))
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tokenizer.train([str(tmp_path / f"{name}.txt") for name in words], trainer)
    directory = tmp_path / "model"
    tiny_model("llama", vocab=tokenizer.get_vocab_size()).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    texts = ["cat dog owl", "one two six ten"]  # texts through the model's own tokenizer
    by_text = embed_sequences(load_causal_lm(directory), texts, tokenizer=tokenizer)
    by_ids = embed_sequences(load_causal_lm(directory), [tokenizer.encode(t).ids for t in texts])
    torch.testing.assert_close(by_text, by_ids, rtol=0, atol=0)
    store = tmp_path / "store"
    main(["prepare", str(store), *[f"--domain={name}={tmp_path / f'{name}.txt'}" for name in words],
          "--tokenizer", str(directory / "tokenizer.json"), "--quiet"])
    out = tmp_path / "weights.json"
    main(["weights", "--model", str(directory), "--data", str(store), "--windows-per-domain", "8",
          "--window-length", "16", "--quiet", "--json", str(out)])
    result = json.loads(out.read_text())
    prepared = DomainStore(store)
    assert prepared.vocab_size == tokenizer.get_vocab_size() and result["domains"] == list(words)
    embeddings = domain_embeddings(load_causal_lm(directory), prepared, windows_per_domain=8, window_length=16,
                                   progress=False)
    torch.testing.assert_close(torch.tensor(result["weights"], dtype=torch.float64),
                               chameleon_weights(embeddings.double()), rtol=1e-6, atol=1e-9)
