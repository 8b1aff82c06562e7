"""The probe's fused form for linear layers (nn.Linear, transformers' Conv1D): on a training
backward, a layer's weight gradient and its per-domain dots ⟨G_i, V⟩ come out of one
weight_grad_dots pass (fastmix.ops.fused_linear), so the step's own `.grad` carries the scores
and the current form's extra GEMM-sized product (rowwise_bilinear) is not run.

`AlignmentProbe(fused=...)` says where:
- "auto" (the default): where the cost model says it is cheaper, call by call
  (fastmix.ops.alignment.fused_is_cheaper: fused_extra_cost against the current form's product).
  On a CPU that is domains of more than 6 rows on average (the op costs 1.0-1.3x the GEMM from
  64 rows a domain, 1.8-2x at 4; the current form's product one GEMM more); a layer no number
  of rows would make cheaper is left untouched.
- True: every call that can take it, whatever it costs;
- False: nowhere.

A call can take it inside a record that is not the probe's first (the first watches how the model
uses its weights, and a weight used outside its layer must be left out of the scores), with
gradients on, its rows led by the domain ids, the layer's weight in the target, neither sharded
(FSDP2) nor in the ghost form. Any other call runs the layer's own forward, scored the current way.

While a record runs, the chosen layers get an instance `forward` that calls fused_linear with a
RecordSink carrying the layer's target; the sink adds the dots to the record's scores, and the
record ends by removing that forward. The layers' own forward hooks still run. A scoring-only
pass (AlignmentProbe.backward) wants no weight gradient: its sinks then compute the input gradient
alone, and the probe's hooks score those layers from their output gradients, the current way.
For eager training (also under DDP); a model compiled by torch.compile should use fused=False.
"""
import functools
import math

import torch

from fastmix.ops import DomainDots, fused_linear
from fastmix.ops.alignment import fused_is_cheaper
from fastmix.probe.rules import conv1d_rule, linear_rule

FUSED_MODES = ("auto", True, False)
WEIGHT_LAYOUT_OF_RULE = {linear_rule: "out_in", conv1d_rule: "in_out"}  # fused_linear's weight_layout


def check_fused(fused):
    if not (fused == "auto" or fused is True or fused is False):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")


def layer_dims(weight, layout):
    """(d_in, d_out) of a linear layer's weight in fused_linear's `layout`."""
    d_first, d_second = weight.shape
    return (d_second, d_first) if layout == "out_in" else (d_first, d_second)


class RecordSink(DomainDots):
    """A DomainDots that adds each backward's dots to a record's scores (a probe's per-domain
    accumulator for one row layout, with `row_ids`, `grouping` and `add_pieces`). The rows'
    grouping by domain is computed once per row layout and record, for all its layers, and the
    pieces' dots are summed by domain once, when the record's result is read."""

    def __init__(self, target, target_bias, scores, num_domains):
        super().__init__(target, scores.row_ids, num_domains, target_bias=target_bias, validate_ids=False)
        self.scores = scores

    def add_pieces(self, piece_dots, grouping):
        self.scores.add_pieces(piece_dots)

    def grouping(self, leading_shape):
        # the scores' row ids are flat, one per row of this layout: the same for all its layers
        if self.scores.grouping is None:
            self.scores.grouping = super().grouping((self.segment_ids.numel(),))
        return self.scores.grouping


class FusedForwards:
    """One record's fused layers, as a context manager that routes their forwards through
    fused_linear while it is open. `sites`: (layer, its probe rule) pairs; `mode`: the probe's
    `fused`; `sink_parts(layer, x)`: (V_W, V_b or None, the record's scores for x's rows) for a
    call that can take the fused form, else None."""

    def __init__(self, sites, mode, num_domains, sink_parts):
        self.mode, self.num_domains, self.sink_parts = mode, num_domains, sink_parts
        self.layouts = {}  # layer: fused_linear's weight_layout
        for module, rule in sites:
            layout = WEIGHT_LAYOUT_OF_RULE.get(rule.score)
            if layout is None or "forward" in vars(module):  # another rule, or a forward set on the instance
                continue
            d_in, d_out = layer_dims(module.weight, layout)
            # the cost per row without the domains' epilogue (the limit of many rows): a layer not cheaper
            # there is cheaper for no batch, so its forward is left alone (torch.compile sees no change)
            if mode == "auto" and not fused_is_cheaper(1, 0, d_in, d_out, module.weight.device.type):
                continue
            self.layouts[module] = layout
        self.fused_modules = set()  # layers with a call in the fused form during this record
        self.sinks = []
        self.just_ran = {}  # layer: the sink of its call that just ran fused, until the probe's hook takes it
        self.traced = False  # torch.compile traced a routed forward

    def __enter__(self):
        for module in self.layouts:
            module.forward = functools.partial(self.forward, module, module.forward)
        return self

    def __exit__(self, *exc):
        for module in self.layouts:
            del module.forward  # back to the class's forward

    def forward(self, module, own_forward, *args, **kwargs):
        if torch.compiler.is_compiling():  # the fused form is for eager training
            self.traced = True
            return own_forward(*args, **kwargs)
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
            return own_forward(*args, **kwargs)
        layout = self.layouts[module]
        if self.mode == "auto":
            d_in, d_out = layer_dims(module.weight, layout)
            if not fused_is_cheaper(math.prod(x.shape[:-1]), self.num_domains, d_in, d_out, x.device.type):
                return own_forward(x)
        parts = self.sink_parts(module, x)
        if parts is None:
            return own_forward(x)
        sink = RecordSink(*parts, self.num_domains)
        self.sinks.append(sink)
        self.fused_modules.add(module)
        self.just_ran[module] = sink
        return fused_linear(x, module.weight, module.bias, sink, weight_layout=layout)

    def taken(self, module):
        """The sink of the layer's call that just ran in the fused form (None if it ran its own
        forward), for the probe's forward hook, which runs right after it."""
        return self.just_ran.pop(module, None)

    def input_grads_only(self):
        """For a scoring-only backward: the fused calls compute their input gradients alone."""
        for sink in self.sinks:
            sink.input_grad_only = True
