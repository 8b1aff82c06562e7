"""Chameleon domain weights from a Hugging Face model's embeddings of the domains.

What it shows: Chameleon needs only one embedding per domain (the mean hidden state of the
model's middle layer over random windows of the domain's text); ridge leverage scores S of those
embeddings give the weights: pretrain mode (softmax of 1/S) favours the domains that share the
most with the others, finetune mode (softmax of S) the most distinctive ones. Adding a domain
needs only its embedding: no proxy model is retrained (the "transfer" part below).

    python examples/chameleon_from_hf_model.py --out runs/chameleon            # a tiny Llama, trained here
    python examples/chameleon_from_hf_model.py --model MY_MODEL_DIR --data MY_STORE --max-steps 0

Without --model, a tiny LlamaForCausalLM is built from a config and trained --max-steps steps on
the uniform mixture of the store's domains (0: embed with random weights), then saved with
save_pretrained to OUT/model and loaded back with fastmix.hidden_states.load_causal_lm, as your
own saved model would be. The store (default: fastmix's built-in corpus) must be tokenized with
the model's tokenizer (`fastmix prepare --tokenizer tokenizer.json`). The same weights come from
the command line: `fastmix weights --model OUT/model --data STORE --windows-per-domain N
--window-length T`.

Writes OUT/weights.json ({"domains", "pretrain": {"scores", "weights"}, "finetune": {...},
"transfer": {"held_out", "weights_without", "weights_with"}}) and OUT/weights.png.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # writes a file; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import fastmix  # noqa: E402
from fastmix.data import DomainMixture, DomainStore, builtin_store  # noqa: E402
from fastmix.hidden_states import load_causal_lm  # noqa: E402
from fastmix.mixing import causal_lm_loss  # noqa: E402

CONTEXT = 64


def train_tiny_llama(store, steps, seed):
    """A 2 x 64 Llama trained `steps` steps on the uniform mixture of the store's domains."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=store.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mixture = DomainMixture.from_store(store, batch_size=16, block_size=CONTEXT, seed=seed)
    for step in range(steps):
        x, y, _ = mixture.next_batch()
        optimizer.zero_grad()
        loss = causal_lm_loss(model, x, y)
        loss.backward()
        optimizer.step()
        if (step + 1) % 10 == 0:
            print(f"step {step + 1:4d}  loss {loss.item():.3f}", flush=True)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=50,
                        help="training steps of the tiny model made without --model (0: random weights)")
    parser.add_argument("--model", help="a saved Hugging Face causal LM (save_pretrained directory)")
    parser.add_argument("--data", default="builtin", help="token store directory, or 'builtin'")
    parser.add_argument("--out", default="runs/chameleon_from_hf_model")
    parser.add_argument("--windows-per-domain", type=int, default=64, help="the published recipe: 2048")
    parser.add_argument("--window-length", type=int, default=CONTEXT, help="the published recipe: 512")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    store = builtin_store() if args.data == "builtin" else DomainStore(args.data)
    model_dir = args.model
    if model_dir is None:
        model_dir = os.path.join(args.out, "model")
        train_tiny_llama(store, args.max_steps, args.seed).save_pretrained(model_dir)
    model = load_causal_lm(model_dir)  # eval mode, local files only

    # (k, d): per domain, the mean over its windows of the middle layer's masked-mean hidden state
    embeddings = fastmix.domain_embeddings(model, store, windows_per_domain=args.windows_per_domain,
                                           window_length=args.window_length, seed=args.seed, progress=False)
    results = {"domains": store.domains}
    for mode in ("pretrain", "finetune"):
        weights, scores = fastmix.chameleon_weights(embeddings.double(), mode=mode, return_scores=True)
        results[mode] = {"scores": scores.tolist(), "weights": weights.tolist()}
    # transfer: the last domain is new; its embedding alone joins the others (nothing retrained)
    held_out = store.domains[-1]
    results["transfer"] = {"held_out": held_out,
                           "weights_without": fastmix.chameleon_weights(embeddings[:-1].double()).tolist(),
                           "weights_with": results["pretrain"]["weights"]}

    print(f"{'domain':<12} {'score':>7} {'pretrain':>9} {'finetune':>9}")
    for i, name in enumerate(store.domains):
        print(f"{name:<12} {results['pretrain']['scores'][i]:7.4f} {results['pretrain']['weights'][i]:9.4f} "
              f"{results['finetune']['weights'][i]:9.4f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "weights.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)

    fig, ax = plt.subplots(figsize=(8, 4))
    positions = torch.arange(len(store.domains), dtype=torch.float64)
    for offset, mode in ((-0.2, "pretrain"), (0.2, "finetune")):
        ax.bar((positions + offset).tolist(), results[mode]["weights"], width=0.4, label=mode)
    ax.set_xticks(positions.tolist(), store.domains, rotation=30, fontsize=8)
    ax.set(title="Chameleon weights from the model's domain embeddings", ylabel="weight")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "weights.png"), dpi=100)
    print(f"wrote {os.path.join(args.out, 'weights.json')} and weights.png")


if __name__ == "__main__":
    main()
