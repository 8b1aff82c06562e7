"""fastmix: fast online data mixing for language-model training (DGA and Chameleon)."""
import importlib

__version__ = "0.1.0"

# Public names -> the module that defines them. Imported on first use so that
# `import fastmix` stays cheap and a missing optional piece never breaks it.
_LAZY = {
    "ops": "fastmix.ops",
    "mixing": "fastmix.mixing",
    "data": "fastmix.data",
    "model": "fastmix.model",
    "train": "fastmix.train",
    "AlignmentProbe": "fastmix.probe",
    "register_probe_rule": "fastmix.probe",
    "OnlineMixing": "fastmix.mixing.online",
    "chameleon_weights": "fastmix.leverage_weights",
    "domain_embeddings": "fastmix.hidden_states",
    "embed_sequences": "fastmix.hidden_states",
    "EmbeddingAccumulator": "fastmix.hidden_states",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastmix' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if _LAZY[name] == f"fastmix.{name}" else getattr(module, name)
    globals()[name] = value
    return value
