"""Online DGA in your own PyTorch loop, on your own text, with a Hugging Face Llama.

What it shows: the integration is about ten lines (marked `# fastmix` below). Your per-domain
texts become token datasets; fastmix.data.DomainMixture draws each training batch from them with
the current domain weights; fastmix.mixing.OnlineMixing runs DGA (Dynamic Gradient Alignment)
from the loop, moving weight toward the domains whose gradients align with the gradient of a
small target set. Here the domains are four kinds of text made up below (English sentences,
code, arithmetic, random characters) and the target is held-out English sentences, so DGA should
move weight to `english`.

    python examples/own_loop_llama.py --max-steps 150 --out runs/own_loop

Prints the weights as training goes and writes OUT/weights.json: {"domains", "target",
"history": [{"step", "loss", "weights"}], "weights"} (the final weights). Runs on CPU in seconds;
nothing is downloaded (the model is built from a config, the tokenizer is bytes).
"""
import argparse
import json
import os
import random

import torch
import transformers

from fastmix.data import DomainMixture
from fastmix.data.tokenizer import ByteTokenizer
from fastmix.mixing import DGA, OnlineMixing, causal_lm_loss

NOUNS = ["cat", "river", "teacher", "city", "garden", "letter", "child", "storm", "market", "song"]
ADJECTIVES = ["old", "quiet", "bright", "small", "busy", "cold", "kind", "green"]
VERBS = ["watches", "follows", "finds", "remembers", "carries", "paints", "hears", "opens"]


def english(rng, lines):
    return [f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}."
            for _ in range(lines)]


def code(rng, lines):
    return [f"def f{rng.randrange(100)}(x):\n    return x {rng.choice('+-*')} {rng.randrange(100)}" for _ in range(lines)]


def arithmetic(rng, lines):
    pairs = [(rng.randrange(1000), rng.randrange(1000)) for _ in range(lines)]
    return [f"{a} + {b} = {a + b}" for a, b in pairs]


def noise(rng, lines):
    return ["".join(rng.choice("qxzjvkw0123 #@") for _ in range(40)) for _ in range(lines)]


def token_items(texts, item_tokens):
    """One domain's texts as a list of token tensors of `item_tokens` each (a map-style dataset)."""
    tokens = torch.from_numpy(ByteTokenizer().encode("\n".join(texts)).astype("int64"))
    return [tokens[i:i + item_tokens] for i in range(0, len(tokens) - item_tokens + 1, item_tokens)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--out", default="runs/own_loop_llama", help="directory for weights.json")
    parser.add_argument("--interval", type=int, default=5, help="DGA updates the weights every N steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    makers = {"english": english, "code": code, "arithmetic": arithmetic, "noise": noise}
    domains = {name: token_items(make(rng, 2000), 256) for name, make in makers.items()}
    target = token_items(english(random.Random(args.seed + 1), 200), 256)  # held-out sentences

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=172,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                      bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    mixture = DomainMixture(domains, batch_size=8, block_size=64, targets={"english-target": target},  # fastmix
                            seed=args.seed)
    mixing = OnlineMixing(DGA(mixture.num_domains, interval=args.interval), model, optimizer, mixture,  # fastmix
                          target="english-target")
    history = []
    for step, (x, y, domain_ids) in zip(range(1, args.max_steps + 1), mixture.loader()):  # fastmix: mixed batches
        optimizer.zero_grad()
        with mixing.record(domain_ids):  # fastmix: around each micro-batch's forward and backward
            loss = causal_lm_loss(model, x, y)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        weights = mixing.step(grad_norm=grad_norm, max_norm=1.0)  # fastmix: after each optimizer step
        history.append({"step": step, "loss": loss.item(), "weights": dict(zip(mixture.domains, weights.tolist()))})
        if step % 10 == 0 or step == args.max_steps:
            shown = "  ".join(f"{name} {w:.3f}" for name, w in history[-1]["weights"].items())
            print(f"step {step:4d}  loss {loss.item():.3f}  weights: {shown}", flush=True)
    mixing.close()  # fastmix: detaches the probe from the model

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "weights.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"domains": mixture.domains, "target": "english-target", "history": history,
                   "weights": history[-1]["weights"] if history else None}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
