"""Online mixing inside Hugging Face transformers.Trainer.

    from fastmix.data import DomainMixture
    from fastmix.integrations.hf_trainer import MixingTrainer
    from fastmix.mixing import DGA

    mixture = DomainMixture(domains, batch_size=16, block_size=512, targets={"math": math_ds})
    trainer = MixingTrainer(model=model, args=TrainingArguments(..., max_steps=1000),
                            mixer=DGA(mixture.num_domains), mixture=mixture, target="math")
    trainer.train()                                   # or train(resume_from_checkpoint=True)

MixingTrainer is a Trainer whose training batches come from `mixture` (a fastmix DomainMixture,
per_device_train_batch_size is the mixture's batch_size) and whose mixer (DGA in any mode,
Universal, Chameleon, ...) runs through fastmix.mixing.OnlineMixing:
- every micro-batch's forward and backward runs under `OnlineMixing.record` (inline DGA, online
  Chameleon), with gradient accumulation as the Trainer does it;
- after every optimizer step (the Trainer's on_optimizer_step, before its scheduler steps and
  its zero_grad) the mixer updates and the mixture draws the next batch with the new weights;
- the weights (`mixing/weight/DOMAIN`) and, for DGA, the last scores (`mixing/score/DOMAIN`) go
  into the Trainer's logs, so its loggers (TensorBoard, W&B, ...) show them;
- the mixer's and the mixture's states are saved in each checkpoint folder (fastmix_mixing.pt),
  and `train(resume_from_checkpoint=...)` restores them. The mixture resumes itself, so the
  Trainer skips no batches on resume (ignore_data_skip is set). The resumed run is the
  uninterrupted one bit for bit (weights, losses and parameters; tested on a tiny GPT-2 with
  dropout): the Trainer restores the checkpoint's RNG state before the first batch, and the
  mixture's loader draws nothing from torch's global generator when it starts (a plain
  DataLoader would, and shift every dropout mask after it).
The loss is causal_lm_loss (next-token cross-entropy of the rows' x against y), or `loss_fn`.
Under torchrun every rank draws its share of the global batch (the mixture's rank/world_size).
"""
import os

import torch

from fastmix.mixing.online import OnlineMixing, causal_lm_loss

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
except ImportError:  # the one line naming what to install
    raise ImportError("fastmix.integrations.hf_trainer needs transformers: pip install transformers") from None

STATE_FILE = "fastmix_mixing.pt"


class _Batches:
    """The mixture's loader, as the dicts the Trainer moves to the device."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for x, y, domain_ids in self.loader:
            yield {"input_ids": x, "targets": y, "domain_ids": domain_ids}


class _MixingCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.start_mixing()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.mixing_step()

    def on_save(self, args, state, control, **kwargs):
        self.trainer.save_mixing(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.mixing.close()


class MixingTrainer(Trainer):
    """A transformers.Trainer with online data mixing (see the module docstring).

    mixer: a fastmix Mixer for mixture.num_domains domains. mixture: a fastmix.data.DomainMixture
    (the training data: train_dataset is not given). target: the target task's name in the
    mixture (DGA needs one). loss_fn(model, x, y): the training loss (default causal_lm_loss).
    The other arguments are the Trainer's.
    """

    def __init__(self, *args, mixer, mixture, target=None, loss_fn=causal_lm_loss, **kwargs):
        if "train_dataset" in kwargs:
            raise ValueError("MixingTrainer: the training data is `mixture`; leave out train_dataset")
        super().__init__(*args, **kwargs)
        self.mixer, self.mixture, self.target, self.loss_fn = mixer, mixture, target, loss_fn
        self.mixing = None
        self._resumed_state = None
        self.args.ignore_data_skip = True  # the mixture resumes from its own state
        self.add_callback(_MixingCallback(self))

    # ---------------------------------------------------------------- data and loss
    def get_train_dataloader(self):
        return _Batches(self.mixture.loader(num_workers=self.args.dataloader_num_workers,
                                            pin_memory=self.args.dataloader_pin_memory))

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.start_mixing()
        with self.mixing.record(inputs["domain_ids"]):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.loss_fn(model, inputs["input_ids"], inputs["targets"])
        return (loss, None) if return_outputs else loss

    def _clip_grad_norm(self, model):
        # the pre-clip norm: universal DGA takes its target from the unclipped gradient
        self._grad_norm = super()._clip_grad_norm(model)
        return self._grad_norm

    # ---------------------------------------------------------------- mixing
    def start_mixing(self):
        """Builds the OnlineMixing once the Trainer has its optimizer (and a resumed state loaded)."""
        if self.mixing is not None:
            return
        self.mixing = OnlineMixing(self.mixer, self.model, self.optimizer, self.mixture, target=self.target,
                                   loss_fn=self.loss_fn, grad_scaler=getattr(self.accelerator, "scaler", None),
                                   autocast=self.autocast_smart_context_manager)
        if self._resumed_state is not None:
            self.mixing.load_state_dict(self._resumed_state)
            self._resumed_state = None

    def mixing_step(self):
        grad_norm, self._grad_norm = getattr(self, "_grad_norm", None), None
        if grad_norm is not None and self.args.max_grad_norm > 0:
            self.mixing.step(grad_norm=grad_norm, max_norm=self.args.max_grad_norm)
        else:
            self.mixing.step()

    def log(self, logs, *args, **kwargs):
        if self.mixing is not None and "loss" in logs:  # training records: the weights with the loss
            for name, weight in zip(self.mixture.domains, self.mixing.weights.tolist()):
                logs[f"mixing/weight/{name}"] = weight
            scores = getattr(self.mixer, "scores", None)
            if scores is not None:
                for name, score in zip(self.mixture.domains, scores.tolist()):
                    logs[f"mixing/score/{name}"] = score
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------- checkpoints
    def save_mixing(self, folder):
        """Writes the mixer's and the mixture's states into the checkpoint folder (all ranks take
        the mixer's state: it may gather; the main process writes)."""
        state = {"mixing": self.mixing.state_dict(), "mixture": self.mixture.state_dict()}
        if self.args.should_save:
            os.makedirs(folder, exist_ok=True)
            torch.save(state, os.path.join(folder, STATE_FILE))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
                if folder is None:
                    raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {self.args.output_dir}")
            path = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"resume_from_checkpoint={folder!r}: no {STATE_FILE} there (not saved by a "
                                 "MixingTrainer)")
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.mixture.load_state_dict(state["mixture"])
            self._resumed_state = state["mixing"]
            self.mixing = None
        return super().train(resume_from_checkpoint, *args, **kwargs)
