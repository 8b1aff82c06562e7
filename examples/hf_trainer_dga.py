"""Online DGA inside a Hugging Face transformers.Trainer, with fastmix's MixingTrainer.

What it shows: MixingTrainer is a Trainer whose training batches come from a
fastmix.data.DomainMixture and whose DGA mixer updates the domain weights after every optimizer
step; the weights go into the Trainer's logs (`mixing/weight/DOMAIN`) and the mixer's and the
mixture's states into every checkpoint, so `--resume` continues the run exactly. The data is
fastmix's built-in corpus (ten generated domains; the target `english` is helped by `grammar`),
the model a tiny GPT-2 or Llama built from a config. With the defaults (100 steps, about 10 s on
one CPU core) DGA makes `grammar` the heaviest domain: from 0.1 to about 0.43 with GPT-2 and
to more than 0.5 with `--model llama` (tests/test_hf_trainer.py checks this setup).

    python examples/hf_trainer_dga.py --out runs/hf_trainer --model llama
    python examples/hf_trainer_dga.py --out runs/hf_trainer --max-steps 200 --resume   # continue it
    torchrun --nproc_per_node 2 examples/hf_trainer_dga.py --out runs/hf_ddp             # DDP (gloo on CPU)

Writes the Trainer's OUT/checkpoint-N folders (each with fastmix_mixing.pt), OUT/weights.json
({"domains", "target", "history": [{"step", "weights"}], "weights"}: the logged weights and the
final ones) and OUT/weights.png (the weights over the steps).
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # writes a file; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from fastmix.data import DomainMixture, builtin_store  # noqa: E402
from fastmix.integrations.hf_trainer import MixingTrainer  # noqa: E402
from fastmix.mixing import DGA  # noqa: E402

TARGET = "english"


def tiny_model(kind, vocab_size, context):
    """2 blocks of width 128, no dropout (as `fastmix train`'s model)."""
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=context, n_embd=128, n_layer=2, n_head=4, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=context, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps (with --resume: up to this step)")
    parser.add_argument("--out", default="runs/hf_trainer_dga", help="the Trainer's output_dir")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--logging-steps", type=int, default=10, help="log the loss and the weights every N steps")
    parser.add_argument("--save-steps", type=int, default=50, help="write a checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    store = builtin_store()
    torch.manual_seed(args.seed)
    model = tiny_model(args.model, store.vocab_size, context=64)
    mixture = DomainMixture.from_store(store, batch_size=16, block_size=64, seed=args.seed)
    training = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.max_steps, learning_rate=3e-3, warmup_steps=20,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 3e-4}, weight_decay=0.1,
        adam_beta2=0.95, max_grad_norm=1.0, logging_steps=args.logging_steps, save_steps=args.save_steps,
        report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True)
    trainer = MixingTrainer(model=model, args=training, mixer=DGA(mixture.num_domains), mixture=mixture,
                            target=TARGET)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    # the weights the Trainer logged (the resumed run's log holds the records before the resume too)
    history = [{"step": 0, "weights": {name: 1 / mixture.num_domains for name in mixture.domains}}]
    history += [{"step": record["step"], "weights": {name: record[f"mixing/weight/{name}"] for name in mixture.domains}}
                for record in trainer.state.log_history if f"mixing/weight/{mixture.domains[0]}" in record]
    final = dict(zip(mixture.domains, trainer.mixing.weights.tolist()))
    print("final weights: " + "  ".join(f"{name} {w:.3f}" for name, w in sorted(final.items(), key=lambda kv: -kv[1])))
    if not trainer.is_world_process_zero():  # under torchrun every rank holds the same weights: rank 0 writes
        return
    with open(os.path.join(args.out, "weights.json"), "w", encoding="utf-8") as f:
        json.dump({"domains": mixture.domains, "target": TARGET, "history": history, "weights": final}, f, indent=1)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in mixture.domains:
        ax.plot([r["step"] for r in history], [r["weights"][name] for r in history], label=name,
                linewidth=2.5 if name == "grammar" else 1)
    ax.set(title=f"DGA weights in a Trainer (target: {TARGET})", xlabel="step", ylabel="weight", ylim=(0, None))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "weights.png"), dpi=100)
    print(f"wrote {os.path.join(args.out, 'weights.json')} and weights.png")


if __name__ == "__main__":
    main()
