"""Data: the domain token store, the mixture sampler, the built-in corpus and `prepare`."""
from fastmix.data.corpus import DOMAINS as BUILTIN_DOMAINS
from fastmix.data.corpus import PARTIAL_RELATIONS as BUILTIN_PARTIAL_RELATIONS
from fastmix.data.corpus import RELATIONS as BUILTIN_RELATIONS
from fastmix.data.corpus import TARGETS as BUILTIN_TARGETS
from fastmix.data.corpus import build_builtin
from fastmix.data.prepare import builtin_store, prepare
from fastmix.data.mixture import DomainMixture, MixtureLoader
from fastmix.data.sampler import MixtureSampler
from fastmix.data.store import DomainStore, StoreError, StoreWriter

__all__ = [
    "DomainStore", "StoreError", "StoreWriter", "MixtureSampler", "DomainMixture", "MixtureLoader", "prepare", "build_builtin", "builtin_store",
    "BUILTIN_DOMAINS", "BUILTIN_TARGETS", "BUILTIN_RELATIONS", "BUILTIN_PARTIAL_RELATIONS",
]
