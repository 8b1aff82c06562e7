"""AlignmentProbe: per-domain gradient alignment ⟨∇L_i, V⟩ from the one backward pass a
training step already does.

Hooks on the layers see each layer's inputs and output gradients, and the layer type's rule
(fastmix.probe.rules: nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, transformers' Conv1D
and RMSNorm classes, or one registered with fastmix.register_probe_rule) turns them into each
row's ⟨g_row, V⟩: for a linear layer one extra GEMM-sized product (fastmix.ops.rowwise_bilinear:
δ_nᵀ V x_n per row, the product never written), or the cheaper "ghost" form when the target
came from few rows. The per-row terms of all layers are summed, then segment-summed by domain
once per record. No per-domain gradient is ever formed. Any other module holding parameters
(a convolution, nn.MultiheadAttention, an RNN, a layer of your own) is scored by the general
rule, which runs the module again and takes one VJP per domain present: per-domain sums, kept
per module for the record. Only modules that mix the rows of a batch (batch norms) are left
out, with a warning.

    probe = AlignmentProbe(model, num_domains)
    model.zero_grad(); target_loss.backward(); probe.set_target()      # V = ∇L_target
    model.zero_grad()
    with probe.record(domain_ids):                                      # (B,) or (B, T)
        loss = model(x, y); loss.backward()
    scores = probe.result().dots                                        # (k,)

Rows are attributed to domains through `domain_ids`, of the shape of the leading dims of
the layer inputs, or of their first dim (one id per sequence). A layer called once for the
whole batch and broadcast over it (a position embedding on arange(T)) hands the model its
output expanded to the batch, so its gradient is split by row like the others'. Per-sequence
ids are exact for any model whose sequences do not interact (no batch norm): the gradient of
domain i is then exactly what the rows of its sequences contribute.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`; make the probe after sharding) the target
is kept as sharded as the parameters' `.grad`, and gathered one layer at a time inside the
backward, where that layer scores this rank's rows; result() all-reduces the k scores.
`probe.target_memory` tells what that costs per rank.

`AlignmentProbe(model, k, fused="auto"|True|False)`: on a training backward a linear layer
(nn.Linear, transformers' Conv1D) can instead score itself inside its own weight-gradient GEMM
(fastmix.ops.fused_linear), with `.grad` as plain autograd's; "auto" (the default) does so where
the cost model (fastmix.ops.alignment.fused_is_cheaper) says it is cheaper. See fastmix.probe.fused;
`probe.fused_layers` names the layers that took that form in the last record.
"""
import contextlib
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fastmix import ops
from fastmix.distributed import world_size
from fastmix.ops.alignment import ghost_is_cheaper
from fastmix.ops.reference import accumulation_dtype, segment_sum
from fastmix.probe.fused import FusedForwards, check_fused
from fastmix.probe.rules import mixes_rows, output_batch_dims, rule_for, vjp_domain_scores


def _is_sharded(tensor):
    """A DTensor: a parameter (or its gradient) of a fully_shard'ed module."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@dataclass
class TargetMemory:
    """Bytes of target this rank holds: its shards of the whole target (all of it when the
    model is not sharded), and at most, while recording, one gathered layer on top of them."""

    held_bytes: int
    peak_gathered_bytes: int  # the largest layer gathered by the records so far (0 if none was)
    model_bytes: int  # the trainable parameters' whole size, for comparison
    model_bytes_held: int  # ... and this rank's share of them

    @property
    def peak_bytes(self):
        return self.held_bytes + self.peak_gathered_bytes


@dataclass
class Coverage:
    """Which trainable parameters the probe's scores include."""

    covered: list
    uncovered: list
    covered_numel: int
    total_numel: int

    @property
    def fraction(self):
        return self.covered_numel / max(self.total_numel, 1)


@dataclass
class AlignmentResult:
    dots: torch.Tensor  # (k,) float64: ⟨∇L_i, V⟩ for the loss backpropagated while recording
    counts: torch.Tensor  # (k,) int64: domain ids seen per domain (rows or sequences)
    missing: list  # hooked layers whose parameters scored nothing: they never ran while recording, or
    #                ran without a target (first seen after the target was set)


# Ops that combine a weight with the rows of a batch: a weight entering one of them outside its
# hooked layer has per-row gradient the hooks never see. Other uses (a regulariser such as
# Σ p², a logged norm) are not per row, so they do not affect the per-domain scores.
_ROW_OPS = {F.linear, F.bilinear, F.embedding, F.layer_norm, F.multi_head_attention_forward, torch.matmul, torch.mm,
            torch.bmm, torch.einsum, torch.addmm, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__,
            torch.Tensor.__rmatmul__}


class _ParameterUses(TorchFunctionMode):
    """Watches one recorded forward for covered weights that enter a row op (_ROW_OPS) outside
    the forward of their hooked layer: a tied head applied with F.linear(h, wte.weight) or
    h @ wte.weight.T. Tensors computed from weights alone (wte.weight.T) carry their weights'
    ids, so a transpose or reshape on the way does not hide the use."""

    def __init__(self, probe):
        super().__init__()
        self.probe = probe
        self.found = {}  # id(parameter): its target, taken out at once so this record's backward skips it
        self.derived = {}  # id(tensor): (tensor, ids of the covered weights it was computed from)

    def _weights_in(self, tensor):
        if isinstance(tensor, nn.Parameter):
            pid = self.probe._registered_id(tensor)
            return {pid} if pid in self.probe._target or pid in self.found else set()
        entry = self.derived.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        probe = self.probe
        if probe._site_depth or probe._in_rule or probe._target is None or not torch.is_grad_enabled():
            return out
        tensors = _tensors_in(args, kwargs)
        weights = set().union(*(self._weights_in(t) for t in tensors)) if tensors else set()
        if not weights:
            return out
        data = [t for t in tensors if not self._weights_in(t) and not isinstance(t, nn.Parameter)]
        if data and func in _ROW_OPS:
            for pid in weights - set(self.found):
                self.found[pid] = probe._target.pop(pid)
        elif not data:  # computed from weights alone: remember where it came from
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.derived[id(t)] = (t, weights)
        return out


def _broadcasts_to(shape, target):
    """Whether a tensor of `shape` broadcasts to `target` (same or fewer dims, each 1 or equal
    from the right)."""
    return len(shape) <= len(target) and all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def _gradient_anchor(output):
    """The tensor whose gradient is a layer's output gradient, for hooks: the output, or the
    tensor it is a reshaped view of (F.linear and F.embedding on 3-D input return views).
    An in-place op on such a view (ReLU(inplace=True), h += r) rebases the view onto its base,
    and a hook on the view itself would never fire."""
    base = output._base
    if (base is not None and base.numel() == output.numel() and base.data_ptr() == output.data_ptr()
            and base.is_contiguous() and output.is_contiguous()):
        return base
    return output


@dataclass
class _Call:
    """A call in progress of a module the general rule scores: the RNG state it started from
    (to run it again with the same dropout), and the hooked modules that ran inside it."""

    module: int  # id of the module
    rng: tuple  # (CPU generator state, (device, its generator state) or None)
    ran: set = field(default_factory=set)


def _rng_state(device):
    return torch.get_rng_state(), ((device, torch.cuda.get_rng_state(device)) if device.type == "cuda" else None)


@contextlib.contextmanager
def _rng_restored(rng):
    """The RNG as it was in `rng` (from _rng_state), and as it is now again after."""
    cpu, accelerator = rng
    with torch.random.fork_rng(devices=[accelerator[0]] if accelerator else []):
        torch.set_rng_state(cpu)
        if accelerator:
            torch.cuda.set_rng_state(accelerator[1], accelerator[0])
        yield


def _whole(tensor):
    return tensor.full_tensor() if _is_sharded(tensor) else tensor


def _tensors_in(args, kwargs):
    """The tensors among a call's arguments, nested ones too, in order."""
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):  # a layer's usual call: no tree walk
        return list(args)
    return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]


class _RowScores:
    """One record's scores for the layers whose inputs share a row layout: per-row sums over
    those layers and per-piece sums of the fused layers, summed by domain only when the result
    is read (once per record, not once per layer), plus the domain sums of layers in the ghost
    form."""

    def __init__(self, row_ids, inv_scale):
        self.row_ids = row_ids  # (rows,) domain id per row, -1 for padding
        self.inv_scale = inv_scale
        self.per_row = None  # (rows,) float64
        self.per_domain = None  # (k,) float64
        self.grouping = None  # the rows' RowGrouping for the fused layers, the same for all of them
        self.per_piece = None  # (pieces,) float64, of that grouping's pieces

    def add_rows(self, values):
        values = values.to(torch.float64)
        self.per_row = values if self.per_row is None else self.per_row + values

    def add_domains(self, values):
        values = values.to(torch.float64)
        self.per_domain = values if self.per_domain is None else self.per_domain + values

    def add_pieces(self, values):
        values = values.to(torch.float64)
        self.per_piece = values if self.per_piece is None else self.per_piece + values

    def domain_sums(self, num_domains):
        out = torch.zeros(num_domains, dtype=torch.float64, device=self.row_ids.device)
        if self.per_row is not None:
            out = out + segment_sum(self.per_row, self.row_ids, num_domains)
        if self.per_domain is not None:
            out = out + self.per_domain
        if self.per_piece is not None:
            out = out + self.grouping.domain_dots(self.per_piece, num_domains)
        return out * self.inv_scale


class AlignmentProbe:
    def __init__(self, model, num_domains, *, strict=False, exclude=(), fused="auto"):
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        check_fused(fused)
        self.fused = fused  # where linear layers score inside their weight-gradient GEMM (fastmix.probe.fused)
        self.fused_layers = []  # ... and which did in the last record
        self._fused = None  # the record's FusedForwards
        self.num_domains = num_domains
        self.strict = strict
        excluded = {id(m) for m in exclude}
        _check_sharding(model)
        # Each hooked layer's trainable parameters, as registered now. FSDP2 swaps other
        # (unsharded) parameter objects into a layer for its forward and backward, so the
        # hooks look a layer's parameters up here, never through the module's attributes.
        self._params_of = {id(m): {attr: p for attr, p in self._registered(m).items() if p.requires_grad}
                           for _, m in model.named_modules() if not mixes_rows(m)}
        self._alias = {}  # id(a parameter object swapped into a layer): id of the one registered in _params_of
        # a layer without trainable parameters (LayerNorm without affine, a frozen one) has nothing to score
        self._sites = [(name, m) for name, m in model.named_modules()
                       if id(m) in self._params_of and id(m) not in excluded and self._site_params(m)]
        # fixed now: a later registration is for later probes; None: the general rule
        self._rules = {id(m): rule_for(m) for _, m in self._sites}
        site_ids = {id(m) for _, m in self._sites}
        # for each module of the general rule, the hooked modules inside it, which it scores in a call where
        # their own hooks do not run (nn.MultiheadAttention applies out_proj's weight with a functional op)
        self._inner_sites = {id(m): [(prefix, sub) for prefix, sub in m.named_modules()
                                     if prefix and id(sub) in site_ids]
                             for _, m in self._sites if self._rules[id(m)] is None}
        self._open_calls = []  # _Call of each module of the general rule whose forward is running
        row_mixing = [name for name, m in model.named_modules() if mixes_rows(m) and id(m) not in excluded
                      and any(p.requires_grad for p in m.parameters(recurse=False))]
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._unsplittable = set()  # site names whose inputs (or, general rule, outputs) carry no batch dimension
        self._fired = set()  # site names whose hooks ran while recording
        self._used_outside = set()  # ids of parameters also used outside their hooked layers
        if strict and self.coverage.uncovered:
            why = f" ({row_mixing} mix the rows of a batch)" if row_mixing else ""
            raise ValueError(f"AlignmentProbe(strict=True): parameters not covered: {self.coverage.uncovered}{why}")
        if row_mixing:
            warnings.warn(f"AlignmentProbe: {row_mixing} mix the rows of a batch (batch statistics, or gradients "
                          "scaled by the batch's token counts), so their gradients cannot be split by domain: they "
                          f"are left out, and the scores cover {self.coverage.fraction:.1%} of the trainable "
                          "parameters (see probe.coverage)", stacklevel=2)
        # torch.compile runs the hook eagerly: it registers autograd hooks and reads storage
        forward_hook = torch.compiler.disable(self._forward_hook)
        self._handles = [m.register_forward_hook(forward_hook, with_kwargs=True) for _, m in self._sites]
        self._handles += [m.register_forward_pre_hook(self._open_call) for _, m in self._sites
                          if self._rules[id(m)] is None]
        self._site_depth = 0  # hooked forwards in progress, counted while the first record is watched
        self._in_rule = False  # a rule is running: calls of its layer are not the model's
        self._site_entries = 0  # ... and begun
        self._site_names = {id(m): name for name, m in self._sites}
        # A weight registered once in the whole model has its target from one layer alone;
        # a tied one (embedding = LM head) sums its uses, so the ghost form can't serve it.
        uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        self._used_once = {pid for pid, count in uses.items() if count == 1}
        self._target = None  # {id(param): dense target tensor}
        self._target_rows = {}  # {id(linear): (x_t, δ_t)} for the ghost form
        self._target_calls = None  # {id(linear): [[x_t, δ_t], ...]} while record_target runs
        self._ids = None  # the domain ids of the batch being recorded
        self._ids_on = {}  # ... and their copies on the devices the layers run on
        self._output_edges = []  # gradient edges of the layers' outputs while recording, for backward()
        self._recorded = False  # a record has run: layers that did not fire are missing
        self._untargeted = set()  # site names that fired with none of their parameters in the target
        self._inv_scale = 1.0
        self._peak_gathered = 0  # bytes of the largest layer of target gathered at once
        self.reset()

    # ------------------------------------------------------------------ coverage
    @staticmethod
    def _registered(module):
        """{"weight": ..., "bias": ...}: the parameters a hooked layer's rule scores, those
        registered on the layer itself."""
        return dict(module.named_parameters(recurse=False))

    def _site_params(self, module):
        return list(self._params_of[id(module)].values())

    def _param(self, module, attr):
        """The registered (under FSDP2: sharded) parameter of a hooked layer, or None."""
        return self._params_of[id(module)].get(attr)

    def _note_swapped(self, module):
        """Remembers the parameter objects a layer runs with, if they are not the registered
        ones (FSDP2's unsharded parameters), so uses of them outside the layer are recognised."""
        for attr, p in self._params_of[id(module)].items():
            current = getattr(module, attr)
            if current is not p:
                self._alias[id(current)] = id(p)

    def _registered_id(self, tensor):
        return self._alias.get(id(tensor), id(tensor))

    def _check_still_registered(self):
        """The layers must still hold the parameters the probe was made with (or FSDP2's
        unsharded stand-ins for them): the target is taken from and kept for those."""
        for name, module in self._sites:
            for attr, p in self._params_of[id(module)].items():
                current = getattr(module, attr)
                if current is not p and self._alias.get(id(current)) != id(p):
                    raise RuntimeError(f"AlignmentProbe: {name}.{attr} is no longer the parameter the probe was "
                                       "made with (was the model sharded with fully_shard, or a parameter "
                                       "replaced, after the probe was made?): make the AlignmentProbe after that")

    def _covered_ids(self):
        """Parameters of the sites that can be scored: all hooked ones until a record has run,
        then those whose hooks ran (a Linear whose weight is used functionally, e.g. inside
        nn.MultiheadAttention, never runs its hook), could be split by row, and are not also
        used outside a hooked layer (seen while watching the first record)."""
        return {id(p) for name, m in self._sites
                if name not in self._unsplittable and (not self._fired or name in self._fired)
                for p in self._site_params(m) if id(p) not in self._used_outside}

    @property
    def coverage(self):
        """Covered and uncovered trainable parameters: from module types at first, from the
        hooks that actually ran once a batch has been recorded."""
        covered = self._covered_ids()
        names = lambda ps: sorted(self._names.get(id(p), "?") for p in ps)  # noqa: E731
        inside = [p for p in self._trainable if id(p) in covered]
        outside = [p for p in self._trainable if id(p) not in covered]
        return Coverage(names(inside), names(outside), sum(p.numel() for p in inside),
                        sum(p.numel() for p in self._trainable))

    # ------------------------------------------------------------------ target
    def set_target(self, grads=None, *, precondition=None, loss_scale=1.0):
        """Takes the target gradient V: the parameters' current `.grad` (default), or a
        dict {parameter name: tensor}. `precondition` ({name: tensor}, e.g. Adam's
        1/(sqrt(v)+eps)) makes the scores ⟨g_i, P ⊙ V⟩. `loss_scale` undoes a GradScaler."""
        self._check_still_registered()
        covered = self._covered_ids()
        params = {id(p): p for p in self._trainable if id(p) in covered}
        target = {}
        for pid, p in params.items():
            name = self._names[pid]
            grad = p.grad if grads is None else grads.get(name)
            if grad is None:
                where = "has no .grad (run backward on the target loss first)" if grads is None else "is missing from grads"
                raise ValueError(f"set_target: parameter {name!r} {where}")
            if grad.shape != p.shape:
                raise ValueError(f"set_target: {name!r} has shape {tuple(grad.shape)}, expected {tuple(p.shape)}")
            if grad.is_sparse:  # an nn.Embedding(sparse=True)'s
                grad = grad.to_dense()
            if _is_sharded(p) and not _is_sharded(grad):
                raise ValueError(f"set_target: {name!r} is sharded (FSDP2), so its target must be a DTensor "
                                 "sharded like it (e.g. its .grad), not a whole tensor")
            value = grad.detach().to(accumulation_dtype(p.dtype)) / loss_scale
            if precondition is not None:
                if name not in precondition:
                    raise ValueError(f"set_target: precondition has no entry for {name!r}")
                value = value * precondition[name].to(value.dtype)
            target[pid] = value
        self._target = target
        self._target_rows = {}  # only record_target() (which calls this first) sets them
        self._untargeted = set()
        return self

    @contextlib.contextmanager
    def record_target(self, *, loss_scale=1.0):
        """Around the forward and backward of the target batch (with gradients zeroed
        before): snapshots `.grad` as the target, and keeps each linear layer's target
        rows so layers where it is cheaper use the ghost form. Under torch.distributed
        the rows would be this rank's alone while `.grad` may be averaged, so only `.grad`
        is kept there."""
        calls = {}
        self._target_calls = calls if world_size() == 1 else None
        self._inv_scale = 1.0 / loss_scale
        try:
            yield self
        finally:
            self._target_calls = None
        self.set_target(loss_scale=loss_scale)  # also clears the previous target's rows
        modules = {id(m): m for _, m in self._sites}
        for mid, pairs in calls.items():
            pairs = [(x, g) for x, g in pairs if g is not None]
            if not pairs or id(self._param(modules[mid], "weight")) not in self._used_once:
                continue
            x_t = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in pairs])
            g_t = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in pairs])
            # with the target formed, the ghost form wins for any batch size or for none
            if ghost_is_cheaper(1, x_t.shape[0], x_t.shape[1], g_t.shape[1], target_formed=True):
                self._target_rows[mid] = (x_t, g_t)

    def target_state_dict(self):
        """The target, to save with a checkpoint: {"dense": {parameter name: V}, "rows": {layer
        name: (x_t, δ_t)}} on the CPU. The rows are kept so that a restored target takes the
        ghost form exactly where the original did (the two forms round differently)."""
        if self._target is None:
            raise RuntimeError("AlignmentProbe.target_state_dict: no target is set")
        return {"dense": {self._names[pid]: _whole_on_cpu(t) for pid, t in self._target.items()},
                "rows": {self._site_names[mid]: (x.cpu().clone(), g.cpu().clone())
                         for mid, (x, g) in self._target_rows.items()}}

    def load_target_state_dict(self, state):
        """Sets the target saved by target_state_dict(), each tensor on its parameter's device
        (and, for a sharded parameter, cut into this rank's shard, as the parameter is)."""
        if "dense" not in state:  # saved before the rows were kept: {parameter name: V}
            state = {"dense": state, "rows": {}}
        params = {self._names[id(p)]: p for p in self._trainable}
        modules = dict(self._sites)
        unknown = sorted(set(state["dense"]) - set(params)) + sorted(set(state["rows"]) - set(modules))
        if unknown:
            raise ValueError(f"load_target_state_dict: the model has no trainable parameter or hooked layer {unknown}")
        self._target = {id(params[n]): _placed_like(t, params[n]) for n, t in state["dense"].items()}
        self._target_rows = {id(modules[n]): (x.to(modules[n].weight.device), g.to(modules[n].weight.device))
                             for n, (x, g) in state["rows"].items()}
        self._untargeted = set()

    def watch_state_dict(self):
        """What the first record learnt by watching the model (the parameters it found used
        outside their hooked layers), to save with a checkpoint, or None before the first
        record. A probe given it back (load_watch_state_dict) does not watch again: its first
        record takes the fused form where the saved probe's later records did, so a resumed
        run scores as the uninterrupted one."""
        if not self._recorded:
            return None
        return {"used_outside": sorted(self._names[pid] for pid in self._used_outside)}

    def load_watch_state_dict(self, state):
        """Takes the watch_state_dict() of a probe on the same model, before the first record."""
        params = {self._names[id(p)]: p for p in self._trainable}
        unknown = sorted(set(state["used_outside"]) - set(params))
        if unknown:
            raise ValueError(f"load_watch_state_dict: the model has no trainable parameter {unknown}")
        self._used_outside = {id(params[name]) for name in state["used_outside"]}
        self._recorded = True

    @property
    def target_memory(self):
        """TargetMemory: what the target costs this rank, beside the model's size."""
        local = lambda t: t.to_local() if _is_sharded(t) else t  # noqa: E731
        held = sum(local(t).nbytes for t in (self._target or {}).values())
        held += sum(x.nbytes + g.nbytes for x, g in self._target_rows.values())
        return TargetMemory(held_bytes=held, peak_gathered_bytes=self._peak_gathered,
                            model_bytes=sum(p.numel() * p.element_size() for p in self._trainable),
                            model_bytes_held=sum(local(p).nbytes for p in self._trainable))

    # ------------------------------------------------------------------ recording
    @contextlib.contextmanager
    def record(self, domain_ids, *, loss_scale=1.0):
        """Around the forward and backward of a batch: adds each domain's ⟨∇L_i, V⟩ for
        the loss backpropagated (divided by `loss_scale`, e.g. a GradScaler's scale).
        Repeated records accumulate until reset(); a record's backward must run before the
        next record starts (its per-row terms are then folded into per-domain sums)."""
        if self._target is None:
            raise RuntimeError("AlignmentProbe.record: call set_target() or record_target() first")
        ids = self._check_ids(domain_ids)
        self._ids = ids
        self._ids_on = {ids.device: ids}
        self._inv_scale = 1.0 / loss_scale
        self._folded = self._domain_sums()  # earlier records are complete: keep their (k,) sums only
        self._layouts = {}  # (leading shape, device) -> _RowScores of this record
        self._vjp_sums = {}
        self._open_calls = []  # left open by a forward that raised
        counts = segment_sum(torch.ones_like(ids.reshape(-1)), ids.reshape(-1), self.num_domains)
        self._counts = counts if self._counts is None else self._counts + counts
        watch = None if self._recorded else _ParameterUses(self)
        self._recorded = True
        self._site_depth = self._site_entries = 0
        # pre-hooks only while watching: they tell which ops run inside a hooked layer
        pre_hooks = ([m.register_forward_pre_hook(self._enter_site) for _, m in self._sites]
                     if watch is not None else [])
        # the first record watches how the model uses its weights: no fused form until that is known
        sites = [(m, self._rules[id(m)]) for _, m in self._sites
                 if watch is None and self.fused is not False and self._rules[id(m)] is not None]  # not general ones
        self._fused = FusedForwards(sites, self.fused, self.num_domains, self._fused_sink_parts)
        try:
            with self._fused:
                if watch is None:
                    yield self
                else:
                    with watch:
                        yield self
        finally:
            self.fused_layers = sorted(self._site_names[id(m)] for m in self._fused.fused_modules)
            if self._fused.traced:  # torch.compile traced the routed layers: leave them as they are from now on
                self.fused = False
            self._fused = None
            self._ids = None
            self._output_edges = []  # backward() runs inside: keeping them would hold the activations
            self._open_calls = []  # left open by a recomputation stopped early (non-reentrant checkpointing)
            for handle in pre_hooks:
                handle.remove()
        if watch is not None and watch.found:
            if not (self._fired and self._site_entries):  # hooks not run (compiled before them): no judging
                self._target.update(watch.found)
                return
            self._used_outside |= set(watch.found)
            names = sorted(self._names[pid] for pid in watch.found)
            message = (f"AlignmentProbe: {names} are also used outside their hooked layers (e.g. a tied weight "
                       "applied with F.linear), where the hooks cannot see their gradient: they are left out of "
                       "the scores (see probe.coverage)")
            if self.strict:
                raise RuntimeError(message)
            warnings.warn(message, stacklevel=3)

    def backward(self, loss):
        """Backpropagates `loss` (computed while recording) only as far as the scores need:
        the hooked layers' output gradients, never a parameter gradient, so `.grad` is left
        as it was. For a pass run only to score domains (DGA's stratified mode), this skips
        the weight-gradient GEMMs, a third of the pass. Call it inside `record`."""
        if self._ids is None:
            raise RuntimeError("AlignmentProbe.backward: call it inside `with probe.record(ids):`")
        edges, self._output_edges = self._output_edges, []
        self._fused.input_grads_only()  # no weight gradient: the hooks score the fused layers instead
        if edges:
            torch.autograd.grad(loss, edges, allow_unused=True)

    def _check_ids(self, domain_ids):
        if not isinstance(domain_ids, torch.Tensor) or domain_ids.dtype.is_floating_point or domain_ids.dtype == torch.bool:
            raise TypeError("domain_ids must be an integer tensor of shape (batch,) or (batch, tokens)")
        ids = domain_ids.to(torch.int64)
        if ids.numel() and int(ids.max()) >= self.num_domains:
            raise ValueError(f"domain_ids contains {int(ids.max())}, but num_domains is {self.num_domains}")
        return ids

    def reset(self):
        """Clears the accumulated scores (the target is kept)."""
        self._layouts = {}  # the last record's scores: {(leading shape, device): _RowScores}
        self._vjp_sums = {}  # ... and of the modules of the general rule: {site name: (k,) float64}
        self._folded = None  # (k,) float64 sums of the records before it
        self._counts = None

    def _domain_sums(self):
        device = next(iter(self._target.values())).device if self._target else torch.device("cpu")
        dots = torch.zeros(self.num_domains, dtype=torch.float64, device=device)
        if self._folded is not None:
            dots = dots + self._folded
        for scores in self._layouts.values():
            dots = dots + scores.domain_sums(self.num_domains).to(device)
        for name, sums in self._vjp_sums.items():
            if name not in self._unsplittable:  # found unsplittable later in the record: none of its sums count
                dots = dots + sums.to(device)
        return dots

    def result(self, *, all_reduce=None):
        """The accumulated scores. Under torch.distributed (by default when a process
        group is initialised) the dots are averaged over ranks, as DDP averages gradients,
        and the counts summed, so every rank sees the same numbers."""
        dots = self._domain_sums()
        counts = self._counts if self._counts is not None else torch.zeros(self.num_domains, dtype=torch.int64)
        counts = counts.to(dots.device)
        never_ran = {name for name, _ in self._sites} - self._fired if self._recorded else set()
        missing = sorted(never_ran | self._untargeted)
        if self.strict and missing:
            raise RuntimeError(f"AlignmentProbe(strict=True): hooked layers whose parameters scored nothing: "
                               f"{missing} (never ran while recording: weights used functionally? or first ran "
                               "after the target was set: set it again)")
        world = world_size()
        if all_reduce is None:
            all_reduce = world > 1
        if all_reduce:
            dots, counts = dots.clone(), counts.clone()
            dist.all_reduce(dots)
            dist.all_reduce(counts)
            dots /= world
        return AlignmentResult(dots=dots, counts=counts, missing=missing)

    def remove(self):
        """Detaches the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _enter_site(self, module, args):
        if self._in_rule:
            return
        self._site_depth += 1
        self._site_entries += 1
        self._note_swapped(module)

    def _open_call(self, module, args):
        if self._in_rule or self._ids is None:
            return
        device = next(iter(self._params_of[id(module)].values())).device
        self._open_calls.append(_Call(id(module), _rng_state(device)))

    def _close_call(self, module):
        """The _Call of the module's call ending now, or None (not recording)."""
        for i in range(len(self._open_calls) - 1, -1, -1):
            if self._open_calls[i].module == id(module):
                call = self._open_calls[i]
                del self._open_calls[i:]  # with any a forward that raised left open inside it
                return call
        return None

    def _mark_ran(self, *module_ids):
        for call in self._open_calls:
            call.ran.update(module_ids)

    def _forward_hook(self, module, args, kwargs, output):
        if self._in_rule:  # a rule running its layer again (jvp_rule): not a call of the model's
            return
        self._site_depth = max(self._site_depth - 1, 0)
        sink = self._fused.taken(module) if self._fused is not None else None  # a fused call's, or None
        rule = self._rules[id(module)]
        if rule is None:
            return self._general_call(module, args, kwargs, output)
        self._mark_ran(id(module))
        if self._ids is None and self._target_calls is None:  # not recording: a plain pass pays little
            return
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        tensors = _tensors_in(args, kwargs)
        inputs = tuple(t.detach() for t in tensors)
        x = inputs[0]
        if rule.autocast_inputs and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)  # what the layer multiplied
            inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
            x = inputs[0]
        inv_scale = self._inv_scale
        shape = output.shape  # the anchor below may be a flattened base of the output
        anchor = _gradient_anchor(output)
        if self._target_calls is not None:
            if isinstance(module, nn.Linear):
                call = [x, None]
                self._target_calls.setdefault(id(module), []).append(call)
                # unscaled in fp32 or wider: fp16 gradients divided by a loss scale underflow
                anchor.register_hook(lambda grad: call.__setitem__(
                    1, grad.detach().to(torch.promote_types(grad.dtype, torch.float32)) * inv_scale))
            return
        if self._ids is None:
            return
        name = self._site_names[id(module)]
        self._fired.add(name)
        self._note_swapped(module)
        params = self._site_params(module)
        if not any(id(p) in self._target for p in params):
            left_out = name in self._unsplittable or any(id(p) in self._used_outside for p in params)
            if not left_out:  # first ran after set_target, which covered the layers seen so far
                self._untargeted.add(name)
            return
        rows = tuple(shape[:-1])
        batch_rows = self._broadcast_to_batch(rows, tensors)
        if batch_rows is not None:
            # The model gets the output already broadcast to the batch, as the op it meets would
            # broadcast it, so that its gradient keeps one row per batch row instead of their sum.
            # An expanded view takes no in-place op: it is its own anchor.
            output = anchor = output.expand(batch_rows + shape[-1:])
            shape = output.shape
            inputs = tuple(t.expand(batch_rows + t.shape[len(rows):]) if tuple(t.shape[:len(rows)]) == rows else t
                           for t in inputs)
        if self._layout(tuple(shape[:-1]), name, x.device) is not None:
            # a fused call scores itself in its backward, unless backward() stops it at the input gradient
            anchor.register_hook(lambda grad: self._contribute(module, rule, inputs, grad.reshape(shape), name)
                                 if sink is None or sink.input_grad_only else None)
            # the edge, not the tensor: an in-place op after the layer (ReLU(inplace=True), h += r)
            # moves the tensor to a later node, whose gradient is not the layer's output gradient
            self._output_edges.append(torch.autograd.graph.get_gradient_edge(anchor))
        return output if batch_rows is not None else None

    def _broadcast_to_batch(self, rows, tensors):
        """The batch's row shape, for a layer called once for the whole batch and broadcast over
        it (a position embedding on arange(T), of shape (T,) or (1, T)): none of its inputs
        carries a gradient, its rows are not led by the domain ids, and they broadcast to the
        ids' shape or to the rows of a layer seen earlier in this record (the token embedding's
        (B, T)). None for any other layer."""
        ids = tuple(self._ids.shape)
        if rows[:len(ids)] == ids or any(t.requires_grad for t in tensors):
            return None
        for batch_rows in [ids + rows[len(ids):]] + [shape for shape, _ in self._layouts]:
            if _broadcasts_to(rows, batch_rows):
                return batch_rows
        return None

    def _ids_for(self, device):
        if device not in self._ids_on:
            self._ids_on[device] = self._ids.to(device, non_blocking=True)
        return self._ids_on[device]

    def _layout(self, shape, name, device):
        """This record's accumulator for rows of shape `shape` (a layer output's leading dims),
        on `device` (it holds the domain id of each row), or None if those rows carry no domain."""
        if (shape, device) in self._layouts:
            return self._layouts[shape, device]
        ids = self._ids_for(device)
        if shape[: ids.dim()] == tuple(ids.shape):
            row_ids = ids.reshape(ids.shape + (1,) * (len(shape) - ids.dim())).expand(shape).reshape(-1)
            self._layouts[shape, device] = _RowScores(row_ids, self._inv_scale)
            return self._layouts[shape, device]
        self._leave_out_unsplittable([name], f"sees inputs of leading shape {shape}, not led by the domain ids' "
                                             f"shape {tuple(ids.shape)} (no batch dimension?)")
        return None

    def _leave_out_unsplittable(self, names, why):
        """Leaves sites out whose gradient cannot be split by domain (names[0] `why`)."""
        if set(names) <= self._unsplittable:
            return
        self._unsplittable.update(names)
        message = (f"AlignmentProbe: {names[0]!r} {why}, so its gradient cannot be split by domain; its parameters "
                   "are left out of the scores (see probe.coverage)")
        if self.strict:
            raise RuntimeError(message)
        warnings.warn(message, stacklevel=3)

    def _general_call(self, module, args, kwargs, output):
        """A call of a module the general rule scores (fastmix.probe.rules.vjp_domain_scores):
        keeps what is needed to run it again, and hooks the gradient of each of its outputs."""
        call = self._close_call(module)
        if call is None or self._ids is None:  # not recording
            return None
        inner = [(prefix, m) for prefix, m in self._inner_sites[id(module)] if id(m) not in call.ran]
        self._mark_ran(id(module), *(id(m) for _, m in inner))  # an enclosing module must not score them again
        if not torch.is_grad_enabled():
            return None
        name = self._site_names[id(module)]
        names = [name] + [self._site_names[id(m)] for _, m in inner]
        self._fired.update(names)
        if name in self._unsplittable:
            return None
        for m in [module] + [m for _, m in inner]:
            self._note_swapped(m)
        params = {f"{prefix}.{attr}": p for prefix, m in inner for attr, p in self._params_of[id(m)].items()}
        params = {**self._params_of[id(module)], **params}
        scored = {}
        for path, p in params.items():  # a parameter registered twice once: functional_call ties the other
            if id(p) in self._target and all(q is not p for q in scored.values()):
                scored[path] = p
        if not scored:
            if not any(id(p) in self._used_outside for p in params.values()):
                self._untargeted.add(name)
            return None
        tensors = _tensors_in(args, kwargs)
        device_type = (tensors[0] if tensors else next(iter(scored.values()))).device.type
        autocast = dict(device_type=device_type, dtype=torch.get_autocast_dtype(device_type),
                        enabled=torch.is_autocast_enabled(device_type))
        saved = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        leaves = pytree.tree_leaves(output)
        outputs = [(j, t) for j, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        expanded = None
        for (j, out), dim in zip(outputs, output_batch_dims(module, [t for _, t in outputs])):
            if not out.requires_grad:
                continue
            ids = self._ids_for(out.device)
            batch_rows = (self._broadcast_to_batch(tuple(out.shape[:-1]), tensors)
                          if isinstance(output, torch.Tensor) else None)
            if batch_rows is not None:  # called once for the whole batch: handed to the model broadcast, as rule sites
                out = expanded = out.expand(batch_rows + out.shape[-1:])
            if tuple(out.shape[dim:dim + ids.dim()]) != tuple(ids.shape):
                why = (f"returns an output of shape {tuple(out.shape)}, not one row per batch row (the domain ids' "
                       f"shape {tuple(ids.shape)} in dim {dim})")
                # left out only if that output's gradient is needed (an RNN's unused h_n is not)
                _gradient_anchor(out).register_hook(lambda grad, why=why: self._leave_out_unsplittable(names, why))
                continue
            row_domains = ids.reshape((1,) * dim + ids.shape + (1,) * (out.dim() - dim - ids.dim()))
            rerun = dict(module=module, saved=saved, rng=call.rng, autocast=autocast, index=j, shape=out.shape)
            anchor = out if out is expanded else _gradient_anchor(out)
            anchor.register_hook(lambda grad, rerun=rerun, row_domains=row_domains, inv_scale=self._inv_scale:
                                 self._contribute_general(name, rerun, scored, grad, row_domains, inv_scale))
            self._output_edges.append(torch.autograd.graph.get_gradient_edge(anchor))
        return expanded

    def _contribute_general(self, name, rerun, scored, grad, row_domains, inv_scale):
        """Adds one call's per-domain sums ⟨g_i, V⟩ over `scored` ({dotted name: parameter})
        from the gradient `grad` of one of its outputs."""
        if name in self._unsplittable:  # an output that cannot be split got its gradient first
            return
        module, (args, kwargs) = rerun["module"], rerun["saved"]
        dtypes = {t.dtype for t in _tensors_in(args, kwargs)}
        dtypes |= {grad.dtype} | {p.dtype for p in scored.values()}
        work = torch.float64 if torch.float64 in dtypes else torch.float32
        target = self._gathered_target(scored, work)

        def output_of(params):
            with _rng_restored(rerun["rng"]), torch.autocast(**rerun["autocast"]):
                out = torch.func.functional_call(module, params, args, kwargs)
            return pytree.tree_leaves(out)[rerun["index"]].expand(rerun["shape"])

        self._in_rule = True
        try:
            # FSDP2 swaps the unsharded parameters into the module around its backward: use them
            # rather than gather the shards again
            params = {path: _whole(module.get_parameter(path)) for path in scored}
            sums = vjp_domain_scores(output_of, params,
                                     grad.reshape(rerun["shape"]), row_domains, self.num_domains, target)
        finally:
            self._in_rule = False
        sums = sums.to(torch.float64) * inv_scale
        self._vjp_sums[name] = sums + self._vjp_sums[name] if name in self._vjp_sums else sums

    def _fused_sink_parts(self, module, x):
        """(V_W, V_b or None, the record's scores for x's rows) for a call of a linear layer that
        can take the fused form (fastmix.probe.fused), else None: the hooks then score it."""
        if self._ids is None or self._in_rule or not torch.is_grad_enabled() or id(module) in self._target_rows:
            return None
        weight, bias = self._param(module, "weight"), self._param(module, "bias")
        target = None if weight is None else self._target.get(id(weight))
        if target is None or _is_sharded(target):
            return None
        rows = tuple(x.shape[:-1])
        if rows[:self._ids.dim()] != tuple(self._ids.shape):  # broadcast over the batch, or no batch dim
            return None
        target_bias = None if bias is None else self._target.get(id(bias))
        if target_bias is not None and target_bias.dtype != target.dtype:
            target_bias = target_bias.to(target.dtype)
        return target, target_bias, self._layout(rows, self._site_names[id(module)], x.device)

    def _contribute(self, module, rule, inputs, grad, name):
        """Adds one layer's ⟨g_n, V⟩ terms for the rows of this call to the record's scores."""
        dtypes = {t.dtype for t in inputs if t.is_floating_point()} | {grad.dtype}
        dtypes |= {p.dtype for p in self._site_params(module)}
        work = torch.float64 if torch.float64 in dtypes else torch.float32
        target = self._layer_target(module, work)  # {attr: this layer's whole V}, gathered if sharded
        g = grad.to(work)
        rows = self._target_rows.get(id(module))  # kept by record_target where the ghost form is cheaper
        if rows is not None and id(self._param(module, "weight")) in self._target:
            x2, g2 = inputs[0].reshape(-1, inputs[0].shape[-1]).to(work), g.reshape(-1, g.shape[-1])
            scores = self._layout(tuple(g.shape[:-1]), name, g.device)
            scores.add_domains(ops.domain_grad_dots_ghost(
                x2, g2, scores.row_ids, self.num_domains, rows[0].to(work), rows[1].to(work),
                validate_ids=False))
        if not target:  # nothing left to score (left out after the hook ran, or all in the ghost form)
            return
        self._in_rule = True
        try:
            per_row = rule.score(module, inputs, g, target)
        finally:
            self._in_rule = False
        scores = self._layout(tuple(per_row.shape), name, g.device)
        if scores is None:
            raise RuntimeError(f"AlignmentProbe: the rule for {type(module).__name__} ({name!r}) returned scores of "
                               f"shape {tuple(per_row.shape)}, whose leading dims are not the domain ids' shape")
        scores.add_rows(per_row.reshape(-1))

    def _layer_target(self, module, work):
        """{attr: V} for the layer's parameters in the target, whole and in `work` dtype: a
        sharded one is gathered here, one layer at a time (the ghost form needs no weight)."""
        return self._gathered_target({attr: p for attr, p in self._params_of[id(module)].items()
                                      if not (attr == "weight" and id(module) in self._target_rows)}, work)

    def _gathered_target(self, params, work):
        """{key: V} for the parameters ({key: parameter}) in the target, whole and in `work` dtype."""
        out, gathered = {}, 0
        for key, p in params.items():
            v = self._target.get(id(p))
            if v is None:
                continue
            if _is_sharded(v):
                v = v.full_tensor()
                gathered += v.nbytes
            out[key] = v.to(work)
        self._peak_gathered = max(self._peak_gathered, gathered)
        return out


def _check_sharding(model):
    """FSDP2 needs its process group for the probe's gathers; FSDP1 flattens the parameters
    out of the layers, where no hook can find them."""
    if dist.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise TypeError("AlignmentProbe: the model is wrapped in FullyShardedDataParallel (FSDP1), whose flat "
                            "parameters no layer hook can see; shard it with torch.distributed.fsdp.fully_shard "
                            "(FSDP2) instead")
    if any(_is_sharded(p) for p in model.parameters()) and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("AlignmentProbe: the model's parameters are sharded (FSDP2 DTensors) but no "
                           "torch.distributed process group is initialised: call "
                           "torch.distributed.init_process_group() first")


def _whole_on_cpu(tensor):
    """A copy of `tensor` on the CPU, gathered whole if it is sharded (every rank must call)."""
    return (tensor.full_tensor() if _is_sharded(tensor) else tensor).cpu().clone()


def _placed_like(tensor, param):
    """A saved whole tensor placed like `param`: on its device, and cut into this rank's shard
    if it is sharded (no communication: each rank keeps its own part)."""
    if not _is_sharded(param):
        return tensor.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
