"""AlignmentProbe (fastmix.probe.core) and its per-layer rules (fastmix.probe.rules)."""
from fastmix.probe.core import AlignmentProbe, AlignmentResult, Coverage, TargetMemory
from fastmix.probe.rules import ProbeRule, register_probe_rule

__all__ = ["AlignmentProbe", "AlignmentResult", "Coverage", "ProbeRule", "TargetMemory", "register_probe_rule"]
