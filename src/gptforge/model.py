"""GPT-2, exactly: one file, read top to bottom.

Parameter names are GPT-2's own (``transformer.wte``, ``transformer.h.N.attn.c_attn``, ...), so
converting to or from Hugging Face's ``GPT2LMHeadModel`` is a key table plus transposes of the
four Conv1D weights. The module is pure: no I/O, no printing, no optimizer, no parallelism.

Shapes: B batch, T time (sequence), C channels (n_embd), nh heads, hs head size, V vocabulary.

For generation, ``forward`` takes an optional ``KVCache``: the keys and values of the positions
already seen, so that each new token costs one position instead of the whole context.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge.config import GPTConfig


class KVCache:
    """Keys and values of every layer for the positions seen so far, for incremental decoding.

    Layer i keeps two (B, nh, max_len, hs) buffers, allocated on first use with the dtype and
    device of its keys; positions [0, length) are filled. ``length`` is also the position (in wpe)
    of the next token. The cache is plain data passed to ``GPT.forward``: the model keeps no state.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten)."""
        self.length = 0

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions [length, length + T) of ``layer``.

        Returns the keys and values of all positions so far, (B, nh, length + T, hs) each.
        ``length`` itself advances in ``GPT.forward``, once every layer has appended.
        """
        B, nh, T, hs = k.shape
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or buf_v is None or buf_k.shape[0] != B:
            buf_k = self.k[layer] = k.new_empty(B, nh, self.max_len, hs)
            buf_v = self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        end = self.length + T
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # index into a KVCache
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # q, k, v for all heads in one matmul, as GPT-2 stores them
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if kv_cache is not None:
            past = kv_cache.length
            k, v = kv_cache.append(self.layer, k, v)  # (B, nh, past + T, hs)
        mask = None
        if past and T > 1:
            # New query i sits at position past + i and may see keys 0 .. past + i.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # Causal without a cache (or when filling an empty one); a single new query sees every
        # cached key, so it needs no mask. Dispatches to flash / memory-efficient kernels where
        # the device has them.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=past == 0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 uses the tanh approximation of GELU (Hendrycks & Gimpel 2016).
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("GPTConfig.vocab_size must be set (>= 1) before building a model")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as in GPT-2: one matrix embeds tokens and scores them.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            # GPT-2 paper, section 2.3: scale the residual projections by 1/sqrt(N) where N is
            # the number of residual additions (two per block).
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied embedding/head matrix once.

        With ``non_embedding`` the position table is left out too (the usual count for scaling
        laws); padded vocabulary rows always count, as they take memory.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied one once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_kv_cache(self) -> KVCache:
        """An empty cache for ``forward(..., kv_cache=...)``, holding up to block_size positions."""
        return KVCache(self.config.n_layer, self.config.block_size)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, with targets (B, T), the mean loss.

        Logits cover the real vocabulary only: padded rows of the embedding table exist for
        matmul speed and can never be predicted. Targets equal to -1 are ignored in the loss.

        With ``kv_cache``, ``idx`` continues the cached positions: its tokens sit at positions
        cache.length .. cache.length + T - 1, attend to every cached key, and are appended to the
        cache. Cached and uncached calls give the same logits (up to float rounding).
        """
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {start + T} exceeds block_size {self.config.block_size}"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.length = start + T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, padded V)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss
