"""Mixers: the Mixer protocol, its registry, and the mixers (DGA, Chameleon register here too)."""
from fastmix.mixing.base import MIXERS, Mixer, MixerContext, build_mixer, register_mixer
from fastmix.mixing.baselines import StaticMixer, Temperature, Uniform

__all__ = ["MIXERS", "Mixer", "MixerContext", "build_mixer", "register_mixer", "StaticMixer", "Temperature", "Uniform"]
