"""The `fastmix` command: one subcommand per job, each with its own --help."""
import argparse
import sys


def _cmd_info(args):
    from fastmix.info import print_info

    print_info()


def _cmd_train(args):
    from fastmix.train import config_from_args, train

    train(config_from_args(args))


def _name_path(text):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _cmd_prepare(args):
    from fastmix.data import build_builtin, prepare
    from fastmix.data.store import DomainStore

    if args.builtin == bool(args.domain):
        raise SystemExit("fastmix prepare: give either --builtin or at least one --domain NAME=PATH")
    if args.builtin:
        build_builtin(args.out, seed=args.seed, overwrite=args.force)
        store = DomainStore(args.out)
    else:
        store = prepare(args.out, args.domain, args.target, tokenizer=args.tokenizer,
                        bpe_vocab_size=args.bpe_vocab_size, text_field=args.text_field,
                        val_fraction=args.val_fraction, workers=args.workers, overwrite=args.force,
                        quiet=args.quiet)
    print(store)


def _add_prepare_arguments(p):
    p.add_argument("out", metavar="OUT", help="directory to create the store in (must not exist unless --force)")
    p.add_argument("--domain", action="append", type=_name_path, default=[], metavar="NAME=PATH",
                   help="a training domain: a text file, a .jsonl file or a directory of them; repeatable")
    p.add_argument("--target", action="append", type=_name_path, default=[], metavar="NAME=PATH",
                   help="a target task (evaluated and used by mixers, never trained on); repeatable")
    p.add_argument("--builtin", action="store_true",
                   help="write the built-in synthetic corpus (10 domains, 3 targets) instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in corpus (default: 0)")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|FILE",
                   help="'byte' (default, no download), 'bpe' (trained here on the data; needs the "
                        "`tokenizers` package) or a tokenizer.json file")
    p.add_argument("--bpe-vocab-size", type=int, default=4096, help="vocabulary size of --tokenizer bpe (default: 4096)")
    p.add_argument("--text-field", default="text", help="field of each .jsonl record that holds the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of each domain's tokens held out for evaluation (default: 0.05)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count, at most 8)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
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
                                       "when no --data is given. Also: python -m fastmix.train, torchrun ... "
                                       "-m fastmix.train.")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
