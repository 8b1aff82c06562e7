"""The built-in corpus: procedurally generated domains with known relations to target tasks.

It needs no download, is deterministic by seed, and is small enough to train on a CPU in
minutes. Each domain is a stream of short documents ("12+35=47\\n") in bytes. Targets are
held-out tasks built from the same generators as some domains: the domains listed in
`RELATIONS` are the ones that should help a target (the ground truth mixers are judged on);
`PARTIAL_RELATIONS` share part of the task or its surface; the others, noise above all,
should not help.
"""
import random
import string

import numpy as np

from fastmix.data.store import StoreWriter
from fastmix.data.tokenizer import ByteTokenizer

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen " \
        "fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n):
    """0..999 in English words: 147 -> 'one hundred forty-seven'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


def _letters(rng, lo=3, hi=8):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _number(rng, max_digits):
    """A number of 1 to max_digits digits, each length equally likely."""
    return rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)


def add_digits(rng):
    # 1- to 3-digit operands: the arith target's two-digit sums are part of this domain's
    # distribution, so "add_digits helps arith" holds by construction.
    a, b = _number(rng, 3), _number(rng, 3)
    return f"{a}+{b}={a + b}\n"


def add_words(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{number_words(a)} plus {number_words(b)} is {number_words(a + b)}\n"


def mul_digits(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return f"{a}*{b}={a * b}\n"


def sort_letters(rng):
    s = _letters(rng)
    return f"sort: {s} -> {''.join(sorted(s))}\n"


def copy_letters(rng):
    s = _letters(rng)
    return f"copy: {s} -> {s}\n"


def reverse_letters(rng):
    s = _letters(rng)
    return f"reverse: {s} -> {s[::-1]}\n"


def brackets(rng):
    """A balanced string over (), [], {} (a Dyck language), up to 12 pairs."""
    out, stack = [], []
    pairs = rng.randint(1, 12)
    opened = 0
    while opened < pairs or stack:
        if opened < pairs and (not stack or rng.random() < 0.5):
            o, c = rng.choice(("()", "[]", "{}"))
            out.append(o)
            stack.append(c)
            opened += 1
        else:
            out.append(stack.pop())
    return "".join(out) + "\n"


_DET = ["the", "a", "every", "no"]
_ADJ = ["small", "red", "old", "happy", "quiet", "green"]
_NOUN = ["cat", "dog", "bird", "child", "farmer", "teacher", "river", "house"]
_VERB = ["sees", "likes", "follows", "finds", "helps", "watches"]
_PREP = ["near", "behind", "under", "with"]


def _noun_phrase(rng, depth=0):
    words = [rng.choice(_DET)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADJ))
    words.append(rng.choice(_NOUN))
    if depth < 1 and rng.random() < 0.3:
        words += [rng.choice(_PREP)] + _noun_phrase(rng, depth + 1)
    return words


def grammar_english(rng):
    """A sentence from a small context-free grammar: NP V NP ."""
    return " ".join(_noun_phrase(rng) + [rng.choice(_VERB)] + _noun_phrase(rng)) + " .\n"


def kv_lookup(rng):
    keys = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
    values = {k: rng.randint(0, 9) for k in keys}
    query = rng.choice(keys)
    pairs = " ".join(f"{k}={v}" for k, v in values.items())
    return f"{pairs} ; {query}? {values[query]}\n"


def noise(rng):
    return "".join(rng.choice(string.printable[:94]) for _ in range(rng.randint(10, 40))) + "\n"


def target_arith(rng):
    """Two-digit additions in the format of `add_digits`."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}={a + b}\n"


def target_strings(rng):
    return copy_letters(rng) if rng.random() < 0.5 else reverse_letters(rng)


DOMAINS = {
    "add_digits": add_digits,
    "add_words": add_words,
    "mul_digits": mul_digits,
    "sort": sort_letters,
    "copy": copy_letters,
    "reverse": reverse_letters,
    "brackets": brackets,
    "grammar": grammar_english,
    "kv_lookup": kv_lookup,
    "noise": noise,
}
TARGETS = {
    "arith": target_arith,
    "strings": target_strings,
    "english": grammar_english,
}
# Ground truth: the domains that should help each target (same task, same format) ...
RELATIONS = {
    "arith": ["add_digits"],
    "strings": ["copy", "reverse"],
    "english": ["grammar"],
}
# ... and those that share only part of it (the operation or the surface form).
PARTIAL_RELATIONS = {
    "arith": ["add_words", "mul_digits"],
    "strings": ["sort"],
    "english": [],
}


def generate(generator, num_tokens, seed, name, split):
    """`num_tokens` bytes of documents from `generator`, deterministic by (seed, name, split)."""
    rng = random.Random(f"fastmix-builtin/{seed}/{name}/{split}")
    docs, size = [], 0
    while size < num_tokens:
        doc = generator(rng)
        docs.append(doc)
        size += len(doc)
    return np.frombuffer("".join(docs).encode("ascii")[:num_tokens], dtype=np.uint8)


def build_builtin(out, seed=0, train_tokens=200_000, val_tokens=20_000, target_train_tokens=20_000,
                  overwrite=False):
    """Write the built-in corpus as a DomainStore at `out`."""
    tokenizer = ByteTokenizer()
    extra = {"builtin": {"seed": seed, "partial_relations": PARTIAL_RELATIONS}}
    with StoreWriter(out, tokenizer.spec(), overwrite=overwrite, relations=RELATIONS, extra_meta=extra) as w:
        for name, gen in DOMAINS.items():
            w.add(name, generate(gen, train_tokens, seed, name, "train"),
                  generate(gen, val_tokens, seed, name, "val"))
        for name, gen in TARGETS.items():
            w.add(name, generate(gen, target_train_tokens, seed, "target-" + name, "train"),
                  generate(gen, val_tokens, seed, "target-" + name, "val"), target=True)
    return out
