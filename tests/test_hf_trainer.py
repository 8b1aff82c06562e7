"""MixingTrainer: a real transformers.Trainer with online DGA on the built-in corpus, CPU."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastmix.data import DomainMixture, DomainStore  # noqa: E402
from fastmix.integrations.hf_trainer import STATE_FILE, MixingTrainer  # noqa: E402
from fastmix.mixing import DGA  # noqa: E402


class StopAt(transformers.TrainerCallback):
    """Interrupts training after `step` (the checkpoint of that step is written first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(store, out, max_steps, mode="stratified", callbacks=()):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=store.vocab_size, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    mixture = DomainMixture.from_store(store, batch_size=4, block_size=16)
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=max_steps, learning_rate=3e-3,
                                          gradient_accumulation_steps=2, save_steps=4, logging_steps=2,
                                          report_to=[], use_cpu=True, seed=0, lr_scheduler_type="cosine",
                                          disable_tqdm=True)
    mixer = DGA(mixture.num_domains, mode=mode, interval=2, target_every=3)
    return MixingTrainer(model=model, args=args, mixer=mixer, mixture=mixture, target=store.targets[0], callbacks=list(callbacks))


def test_interrupted_and_resumed_run_is_exact(store_dir, tmp_path):
    """Resumed at a checkpoint, the run ends with the uninterrupted run's weights, losses and
    parameters bit for bit (GPT-2's dropout is on: the RNG stream must continue exactly)."""
    store = DomainStore(store_dir)
    whole = _trainer(store, tmp_path / "whole", 8)
    whole.train()
    losses = [r["loss"] for r in whole.state.log_history if "loss" in r]
    assert any("mixing/weight/" in key for r in whole.state.log_history for key in r)
    first = _trainer(store, tmp_path / "cut", 8, callbacks=[StopAt(4)])
    first.train()
    assert (tmp_path / "cut" / "checkpoint-4" / STATE_FILE).is_file()
    resumed = _trainer(store, tmp_path / "cut", 8)
    resumed.train(resume_from_checkpoint=True)
    resumed_losses = [r["loss"] for r in resumed.state.log_history if "loss" in r]
    assert whole.model.config.resid_pdrop > 0
    assert not torch.equal(whole.mixing.weights, torch.full_like(whole.mixing.weights, 1 / store.num_domains))
    assert torch.equal(resumed.mixing.weights, whole.mixing.weights)
    assert resumed_losses[-2:] == losses[-2:]
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
