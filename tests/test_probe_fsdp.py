"""AlignmentProbe on FSDP2 models (torch.distributed.fsdp.fully_shard; 2 gloo CPU processes, float64):
fastmix's GPT, Hugging Face's GPT-2 and Llama, and Llamas with layers only the general rule
covers. The scores equal those of the same model unsharded, while the target stays sharded and
is gathered one layer at a time."""
import os

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_distributed
from fastmix import AlignmentProbe
from fastmix.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
K = 3
CONFIG = GPTConfig(block_size=8, vocab_size=19, n_layer=2, n_head=2, n_embd=8)


def _model_and_batches(seed):
    torch.manual_seed(seed)
    model = GPT(CONFIG).double()
    target = torch.randint(0, CONFIG.vocab_size, (2, 8))
    batches = [torch.randint(0, CONFIG.vocab_size, (4, 8)) for _ in range(2)]  # one per rank
    ids = [torch.randint(0, K, (4,)) for _ in range(2)]
    return model, target, batches, ids


def _loss(model, x):
    return model(x, torch.roll(x, -1, 1))[1]


def _set_target(model, probe, target, loss=_loss):
    model.zero_grad()
    loss(model, target).backward()
    probe.set_target()
    model.zero_grad()


class _Gathers(TorchDispatchMode):
    """Sizes of the all-gathers DTensors make (FSDP2's own parameter gathers are c10d ops, not
    these functional ones), and of the all-reduces."""

    def __init__(self):
        super().__init__()
        self.gathered, self.reduced = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket == torch.ops._c10d_functional.all_gather_into_tensor:
            self.gathered.append(out.numel())
        if func.overloadpacket in (torch.ops.c10d.allreduce_, torch.ops._c10d_functional.all_reduce):
            self.reduced.append(sum(t.numel() for t in args[0]) if isinstance(args[0], list) else args[0].numel())
        return out


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def _worker(rank, world, seed, out):
    model, target, batches, ids = _model_and_batches(seed)
    _shard(model)
    probe = AlignmentProbe(model, K)
    _set_target(model, probe, target)
    results = {}

    gathers = _Gathers()
    with gathers:
        with probe.record(ids[rank]):
            _loss(model, batches[rank]).backward()
        results["dots"] = probe.result().dots
    results["gathered"], results["reduced"] = gathers.gathered, gathers.reduced
    memory = probe.target_memory
    results["memory"] = (memory.held_bytes, memory.peak_gathered_bytes, memory.model_bytes, memory.model_bytes_held)

    probe.reset()  # DGA's scoring pass: the backward stops at the layers' outputs
    model.zero_grad()
    with probe.record(ids[rank]):
        probe.backward(_loss(model, batches[rank]))
    results["dots_scoring_only"] = probe.result().dots
    results["grads_untouched"] = all(p.grad is None for p in model.parameters())

    saved = probe.target_state_dict()  # whole tensors on the CPU, then cut back into shards
    restored = AlignmentProbe(model, K)
    restored.load_target_state_dict(saved)
    with restored.record(ids[rank]):
        _loss(model, batches[rank]).backward()
    results["dots_restored"] = restored.result().dots
    results["saved_shapes"] = {name: tuple(t.shape) for name, t in saved["dense"].items()}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def test_scores_equal_the_unsharded_model(tmp_path, seed):
    run_distributed(_worker, tmp_path, seed, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model, target, batches, ids = _model_and_batches(seed)  # the same model and batches, in one process
    probe = AlignmentProbe(model, K)
    _set_target(model, probe, target)
    for x, domain_ids in zip(batches, ids):
        with probe.record(domain_ids):
            _loss(model, x).backward()
    want = probe.result(all_reduce=False).dots / 2  # averaged over ranks, as the gradients are
    for rank in ranks:
        for key in ("dots", "dots_scoring_only", "dots_restored"):
            torch.testing.assert_close(rank[key], want, rtol=1e-8, atol=1e-12, msg=key)
        assert rank["grads_untouched"]
        assert rank["saved_shapes"] == {n: tuple(p.shape) for n, p in model.named_parameters()}

    # one layer's worth gathered at a time, each layer's target once per call, plus k numbers reduced
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm))]
    # (FSDP2 pads dim 0 to a multiple of the world size: 19 rows are gathered as 2 x 10)
    per_param = sorted(-(-p.shape[0] // 2) * 2 * p[0].numel() for m in layers for p in m.parameters(recurse=False))
    for rank in ranks:
        assert sorted(rank["gathered"]) == per_param  # the tied wte/lm_head weight is gathered by both of its layers
        assert rank["reduced"] == [K, K]  # the dots and the counts
        held, peak, model_bytes, model_held = rank["memory"]
        largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in layers) * 8
        assert peak == largest_layer
        assert model_bytes == model.num_params() * 8
        assert held == model_held < model_bytes  # the target is sharded like the parameters


def _misuse_worker(rank, world, out):
    from torch.distributed.fsdp import FullyShardedDataParallel

    torch.manual_seed(0)
    model = GPT(CONFIG).double()
    early = AlignmentProbe(model, K)  # made before the model is sharded
    _shard(model)
    _loss(model, torch.randint(0, CONFIG.vocab_size, (2, 8))).backward()
    with pytest.raises(RuntimeError, match=r"no longer the parameter the probe was made with.*fully_shard"):
        early.set_target()

    probe = AlignmentProbe(model, K)
    whole = {name: torch.randn(p.shape, dtype=torch.float64) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"is sharded \(FSDP2\), so its target must be a DTensor"):
        probe.set_target(whole)

    with pytest.raises(TypeError, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard"):
        AlignmentProbe(FullyShardedDataParallel(GPT(CONFIG), device_id=torch.device("cpu")), K)

    dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="no torch.distributed process group is initialised"):
        AlignmentProbe(model, K)
    # the runner destroys the group when the worker returns: give it a fresh one
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'second_group')}", rank=rank,
                            world_size=world)


def test_misuse_is_one_clear_error(tmp_path):
    run_distributed(_misuse_worker, tmp_path, str(tmp_path))


def _decoder_layers(model):
    """The decoder layers of a Hugging Face causal LM: its one ModuleList (GPT-2's h, Llama's layers)."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))


class LayerScaled(torch.nn.Module):
    """A decoder layer whose update is scaled by a parameter of its own: a module of the general
    rule that is also the unit fully_shard gathers, rerun whole in the backward."""

    def __init__(self, layer, width, dtype):
        super().__init__()
        self.layer = layer
        self.scale = torch.nn.Parameter(torch.rand(width, dtype=dtype) + 0.5)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.scale * (self.layer(hidden_states, *args, **kwargs) - hidden_states)


def _with_own_mlps(model):
    from test_probe_general import Weird  # its own parameters used in its forward, beside a child Linear

    for layer in _decoder_layers(model):
        layer.mlp = Weird(model.config.hidden_size).to(model.dtype)


def _with_scaled_layers(model):
    layers = _decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = LayerScaled(layer, model.config.hidden_size, model.dtype)


# a tiny Llama with layers only the general rule covers
WITH_OWN_LAYERS = dict(llama_own_mlp=_with_own_mlps, llama_scaled_layers=_with_scaled_layers)


def _hf_model_and_batches(name, seed):
    from test_probe_hf import VOCAB, tiny_model

    torch.manual_seed(seed)
    model = tiny_model("llama" if name in WITH_OWN_LAYERS else name, torch.float64)
    if name in WITH_OWN_LAYERS:
        WITH_OWN_LAYERS[name](model)
    target = torch.randint(0, VOCAB, (2, 8))
    batches = [torch.randint(0, VOCAB, (4, 8)) for _ in range(2)]  # one per rank
    ids = [torch.randint(0, K, (4,)) for _ in range(2)]
    return model, target, batches, ids


def _hf_loss(model, x):
    return model(input_ids=x, labels=x).loss


def _hf_worker(rank, world, name, seed, out):
    from torch.distributed.fsdp import fully_shard

    model, target, batches, ids = _hf_model_and_batches(name, seed)
    for layer in _decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    probe = AlignmentProbe(model, K, strict=True)
    _set_target(model, probe, target, _hf_loss)
    gathers = _Gathers()
    with gathers, probe.record(ids[rank]):
        _hf_loss(model, batches[rank]).backward()
    result = probe.result()
    memory = probe.target_memory
    results = dict(dots=result.dots, missing=result.missing, fraction=probe.coverage.fraction,
                   memory=(memory.held_bytes, memory.peak_gathered_bytes, memory.model_bytes),
                   gathers=len(gathers.gathered))
    probe.reset()  # DGA's scoring pass
    with probe.record(ids[rank]):
        probe.backward(_hf_loss(model, batches[rank]))
    results["dots_scoring_only"] = probe.result().dots
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


# GPT-2: Conv1D layers, a head tied to wte, wpe called on positions of shape (1, T); Llama: GQA,
# an untied head, LlamaRMSNorm (jvp_rule)
@pytest.mark.parametrize("name", ["gpt2", "llama", *WITH_OWN_LAYERS])
def test_scores_on_hf_models_equal_the_unsharded_model(tmp_path, seed, name):
    """Each decoder layer sharded, then the model, as Hugging Face models are sharded."""
    pytest.importorskip("transformers")
    run_distributed(_hf_worker, tmp_path, name, seed, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model, target, batches, ids = _hf_model_and_batches(name, seed)
    probe = AlignmentProbe(model, K, strict=True)
    _set_target(model, probe, target, _hf_loss)
    for x, domain_ids in zip(batches, ids):
        with probe.record(domain_ids):
            _hf_loss(model, x).backward()
    want = probe.result(all_reduce=False).dots / 2  # averaged over ranks, as the gradients are
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()) * 8
    # each parameter's target gathered once (GPT-2's wte twice: it is the head's weight too), and
    # no parameter gathered again: the general rule reruns its module on what FSDP2 unsharded
    gathers = len(list(model.parameters())) + (name == "gpt2")
    for rank in ranks:
        for key in ("dots", "dots_scoring_only"):
            torch.testing.assert_close(rank[key], want, rtol=1e-8, atol=1e-12, msg=key)
        assert rank["fraction"] == 1.0 and rank["missing"] == []
        held, peak, model_bytes = rank["memory"]
        assert model_bytes == sum(p.numel() for p in model.parameters()) * 8
        assert held < model_bytes and peak == largest_layer  # sharded, and gathered one layer at a time
        assert rank["gathers"] == gathers
