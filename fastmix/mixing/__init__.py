"""Mixers: the Mixer base class, its registry, and the mixers: uniform, temperature, DGA,
universal (DoGE-style), Chameleon and importance sampling over clusters (the baseline); OnlineMixing drives
any of them from a user's own training loop."""
from fastmix.mixing.base import MIXERS, Mixer, MixerContext, build_mixer, register_mixer
from fastmix.mixing.baselines import StaticMixer, Temperature, Uniform
from fastmix.mixing.dga import DGA
from fastmix.mixing.universal import Universal
from fastmix.mixing.chameleon import Chameleon
from fastmix.mixing.online import OnlineMixing, causal_lm_loss
from fastmix.mixing.importance import ImportanceSampling

__all__ = ["MIXERS", "Mixer", "MixerContext", "build_mixer", "register_mixer", "StaticMixer", "Temperature", "Uniform",
           "DGA", "Universal", "Chameleon", "ImportanceSampling", "OnlineMixing", "causal_lm_loss"]
