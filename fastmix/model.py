"""A minimal GPT (nanoGPT-like): pre-LayerNorm blocks, SDPA causal attention, tied head.

Hidden states of block i are the output of `model.transformer.h[i]`, so a forward hook there
sees them (Chameleon's domain embeddings hook the middle block).
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 257
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers (LayerNorms always have one)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input embedding and output head
        self.apply(self._init_weights)
        # Scaled init (GPT-2): residual projections shrink with depth so the residual stream
        # keeps the same scale whatever the number of layers.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """The model of a `fastmix train` checkpoint (`ckpt.pt`, or the run directory)."""
        from fastmix.rundir import load_checkpoint  # verified: a damaged file is one line naming it

        ckpt = load_checkpoint(checkpoint_file(path))
        model = cls(checkpoint_config(ckpt))
        model.load_state_dict(ckpt["model"])
        return model.to(device)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy or None)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} > block_size {self.config.block_size}")
        # Positions with a batch dimension (not a broadcast arange(T)), so that per-row hooks
        # can attribute the position embedding's gradient to rows.
        pos = torch.arange(T, device=idx.device).expand(B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            # in fp32 at least (bf16 logits under autocast), never below the logits' own dtype
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(wide.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def lm_loss(model, x, y):
    """The `loss_fn(model, x, y) -> loss` of the training loop and the mixers."""
    return model(x, y)[1]


def checkpoint_file(path):
    """The ckpt.pt a path names: the file itself, or the one in a `fastmix train` run directory."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def checkpoint_config(ckpt):
    """The GPTConfig of a loaded `fastmix train` checkpoint (dropout off: the model is for use)."""
    cfg = ckpt["config"]
    return GPTConfig(block_size=cfg["block_size"], vocab_size=ckpt["model"]["lm_head.weight"].shape[0],
                     n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0,
                     bias=cfg["bias"])
