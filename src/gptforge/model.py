"""GPT-2, exactly: one file, read top to bottom.

Parameter names are GPT-2's own (``transformer.wte``, ``transformer.h.N.attn.c_attn``, ...), so
converting to or from Hugging Face's ``GPT2LMHeadModel`` is a key table plus transposes of the
four Conv1D weights. The module is pure: no I/O, no printing, no optimizer, no parallelism.

Shapes: B batch, T time (sequence), C channels (n_embd), nh heads, hs head size, V vocabulary.

For generation, ``forward`` takes an optional cache of the keys and values of the positions
already seen, so that each new token costs one position instead of the whole context. The cache
decides where new tokens sit and what they may attend to: ``KVCache`` holds rows of one shared
length (the samples of one prompt); ``RaggedKVCache`` holds rows each at its own length (unrelated
requests decoded together by the server), one new token per row per call.
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
        self.mask: torch.Tensor | None = None  # of the call in progress, see prepare
        self.is_causal = True

    def reset(self) -> None:
        """Forget every position (the buffers are kept and overwritten)."""
        self.length = 0

    def prepare(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        """Positions (T,) of T new tokens per row; sets the attention mask of this call."""
        past = self.length
        if past + T > self.max_len:
            raise ValueError(f"sequence of length {past + T} exceeds block_size {self.max_len}")
        # Causal when filling an empty cache; a single new query sees every cached key, so it
        # needs no mask; otherwise new query i sits at position past + i, seeing keys 0..past + i.
        self.is_causal = past == 0
        self.mask = None
        if past and T > 1:
            self.mask = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)
        return torch.arange(past, past + T, dtype=torch.long, device=device)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions [length, length + T) of ``layer``.

        Returns the keys and values of all positions so far, (B, nh, length + T, hs) each.
        ``length`` itself advances in ``advance``, once every layer has appended.
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

    def advance(self, T: int) -> None:
        self.length += T


class RaggedKVCache:
    """Keys and values of up to ``rows`` unrelated sequences, each at its own length.

    Row b holds positions [0, lengths[b]). A forward call feeds one new token to each of the
    first B rows (B is its batch size), at position lengths[b] of that row, and that query sees
    keys 0 .. lengths[b] of its own row only: the mask hides the rest of the (B, nh, L, hs) slice,
    L being the longest row. Masked keys get exactly zero weight, so a row's result does not
    depend on the rows beside it. Rows are filled from a prompt's ``KVCache`` with ``load``; the
    buffers are zeroed once so that masked slots never hold NaN (0 * NaN would leak through).
    """

    def __init__(self, n_layer: int, rows: int, max_len: int):
        self.rows = rows
        self.max_len = max_len
        self.lengths = [0] * rows
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.mask: torch.Tensor | None = None
        self.is_causal = False
        self._pos: torch.Tensor | None = None  # (B,) positions of the call in progress

    def prepare(self, B: int, T: int, device: torch.device) -> torch.Tensor:
        """Positions (B, 1) of each row's new token; sets the attention mask of this call."""
        if T != 1 or not 1 <= B <= self.rows:
            raise ValueError(f"a ragged cache takes one token for each of 1..{self.rows} rows, "
                             f"got ({B}, {T})")
        lengths = self.lengths[:B]
        if max(lengths) + 1 > self.max_len:
            raise ValueError(
                f"sequence of length {max(lengths) + 1} exceeds block_size {self.max_len}"
            )
        self._pos = torch.tensor(lengths, dtype=torch.long, device=device)  # (B,)
        self.mask = None  # rows of one length see every key: no mask, as KVCache
        if min(lengths) != max(lengths):
            keys = torch.arange(max(lengths) + 1, device=device)  # (L,)
            self.mask = (keys[None, :] <= self._pos[:, None]).view(B, 1, 1, -1)  # (B, 1, 1, L)
        return self._pos[:, None]

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s (rows, nh, max_len, hs) buffers; ``like`` is (B, nh, T, hs)."""
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or buf_v is None:
            shape = (self.rows, like.size(1), self.max_len, like.size(3))
            buf_k = self.k[layer] = like.new_zeros(shape)
            buf_v = self.v[layer] = like.new_zeros(shape)
        return buf_k, buf_v

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store row b's k, v (B, nh, 1, hs) at its position; keys and values (B, nh, L, hs)."""
        assert self._pos is not None, "prepare() first"
        B = k.size(0)
        buf_k, buf_v = self._buffers(layer, k)
        rows = torch.arange(B, device=k.device)
        buf_k[rows, :, self._pos] = k[:, :, 0]  # (B, nh, hs) into row b, position pos[b]
        buf_v[rows, :, self._pos] = v[:, :, 0]
        end = max(self.lengths[:B]) + 1
        return buf_k[:B, :, :end], buf_v[:B, :, :end]

    def advance(self, T: int) -> None:
        assert self._pos is not None
        for b in range(self._pos.numel()):
            self.lengths[b] += T
        self._pos = None

    def load(self, row: int, cache: KVCache, src: int = 0) -> None:
        """Make ``row`` a copy of row ``src`` of a filled ``cache`` (a prompt run on its own)."""
        n = cache.length
        if n > self.max_len:
            raise ValueError(f"sequence of length {n} exceeds block_size {self.max_len}")
        for layer, (k, v) in enumerate(zip(cache.k, cache.v)):
            assert k is not None and v is not None, "load a cache that has been filled"
            buf_k, buf_v = self._buffers(layer, k)
            buf_k[row, :, :n] = k[src, :, :n]
            buf_v[row, :, :n] = v[src, :, :n]
        self.lengths[row] = n

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` into row ``dst`` (to keep the rows in use at the front)."""
        n = self.lengths[src]
        for buf_k, buf_v in zip(self.k, self.v):
            if buf_k is not None and buf_v is not None:
                buf_k[dst, :, :n] = buf_k[src, :, :n]
                buf_v[dst, :, :n] = buf_v[src, :, :n]
        self.lengths[dst] = n


def _slice_of_head(x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor | None, eps: float,
                   w: torch.Tensor, t: torch.Tensor, vocab: int, scale: torch.Tensor,
                   grad_w: torch.Tensor | None) -> tuple[torch.Tensor, tuple | None]:
    """One slice of S positions: final LayerNorm, head and cross-entropy, and with ``grad_w``
    (V', C) the gradients of loss x ``scale`` as well, the head's added into ``grad_w``.

    x (S, C); w (V', C) already in the matmul's dtype; t (S,), -1 ignored. Returns the slice's
    summed loss and (d x, d ln_w, d ln_b) or None. The logits (S, V') exist only in here.
    """
    C = x.size(1)
    h, mean, rstd = torch.ops.aten.native_layer_norm(x, [C], ln_w, ln_b, eps)  # (S, C)
    hc = h.to(w.dtype)
    logits = (hc @ w.t()).float()  # (S, V'), fp32 as the unsliced loss takes them
    if logits.size(1) > vocab:
        logits[:, vocab:] = float("-inf")  # padded rows can never be predicted
    scored = t != -1
    t = t.masked_fill(~scored, 0)
    logp = torch.log_softmax(logits, dim=1)
    del logits
    loss = -(logp.gather(1, t[:, None]).squeeze(1) * scored).sum()
    if grad_w is None:
        return loss, None
    # d loss / d logits = softmax - one_hot(target), per scored position, times scale
    g = logp.exp_()
    g.scatter_add_(1, t[:, None], -scored.to(g.dtype)[:, None])
    g.mul_((scored * scale)[:, None])
    g = g.to(w.dtype)
    dh = (g @ w).to(h.dtype)  # (S, C)
    if grad_w.dtype == w.dtype:
        grad_w.addmm_(g.t(), hc)  # (V', C) accumulated in place
    else:
        grad_w += g.t() @ hc  # bf16 products into the fp32 sum
    mask = [True, ln_w.requires_grad, ln_b is not None and ln_b.requires_grad]
    return loss, torch.ops.aten.native_layer_norm_backward(dh, x, [C], mean, rstd, ln_w, ln_b, mask)


class SlicedHeadLoss(torch.autograd.Function):
    """Final LayerNorm, tied head and mean cross-entropy over slices of ``slice_tokens``
    positions, so that no more than one slice's logits (slice_tokens x V) ever exist.

    With GPT-2's 50,257-token vocabulary the logits dwarf every other activation: 4 x 1024
    positions make 823 MB of them in fp32, and the unsliced loss keeps them, their log-softmax
    and their gradient. Here each slice's gradients are computed in the forward pass, while its
    logits are at hand, and the backward pass only scales them by the incoming gradient: no
    recomputation, the same three matmuls as the unsliced head. This is Liger-Kernel's fused
    linear cross-entropy (linkedin/Liger-Kernel, src/liger_kernel/ops/fused_linear_cross_entropy.py,
    after mgmalek/efficient_cross_entropy); recomputing each slice's logits in the backward pass
    instead (Cut Cross-Entropy, Wijmans et al. 2024, arXiv:2411.09009) keeps only a per-position
    log-sum-exp but costs a fourth matmul: 0.70x the head's speed here (BENCHMARKS.md).

    Numerically it is the unsliced path re-associated: the same LayerNorm kernels, the matmuls
    in ``compute_dtype`` (autocast's, where it is on) with fp32 logits, the mean over positions
    whose target is not -1. Gradients are sums over slices instead of over all positions at once.
    """

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, weight, targets, eps, vocab, slice_tokens, compute_dtype,
                want_grads):
        # x (N, C), targets (N,); autocast off in here: the casts are explicit
        with torch.autocast(x.device.type, enabled=False):
            N = x.size(0)
            w = weight.to(compute_dtype)  # (V', C), once for every slice
            count = (targets != -1).sum()
            scale = 1.0 / count  # the mean over scored positions (0/0 is NaN, as F.cross_entropy)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
            grad_x = torch.empty_like(x) if want_grads else None
            grad_ln = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if p is not None else None
                       for p in (ln_w, ln_b)]
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            for a in range(0, N, slice_tokens):
                b = min(a + slice_tokens, N)
                part, grads = _slice_of_head(x[a:b], ln_w, ln_b, eps, w, targets[a:b], vocab, scale, grad_w)
                loss = loss + part
                if grads is not None:
                    grad_x[a:b] = grads[0]
                    for acc, g in zip(grad_ln, grads[1:]):
                        if acc is not None and g is not None:
                            acc += g
        if want_grads:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype), *[
                g.to(p.dtype) if g is not None else None for g, p in zip(grad_ln, (ln_w, ln_b))])
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [g * grad_loss if g is not None else None for g in ctx.saved_tensors]
        grad_x, grad_w, grad_ln_w, grad_ln_b = grads
        return grad_x, grad_ln_w, grad_ln_b, grad_w, None, None, None, None, None, None


def sliced_head_loss(x: torch.Tensor, ln_f: nn.LayerNorm, weight: torch.Tensor, targets: torch.Tensor,
                     vocab: int, slice_tokens: int) -> torch.Tensor:
    """The mean cross-entropy of ln_f(x) @ weight.T against targets (-1 ignored), in slices of
    ``slice_tokens`` positions (SlicedHeadLoss). x (B, T, C), targets (B, T)."""
    C = x.size(-1)
    dev = x.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    want_grads = torch.is_grad_enabled() and any(
        p is not None and p.requires_grad for p in (x, ln_f.weight, ln_f.bias, weight))
    return SlicedHeadLoss.apply(x.reshape(-1, C), ln_f.weight, ln_f.bias, weight, targets.reshape(-1),
                                ln_f.eps, vocab, slice_tokens, compute_dtype, want_grads)


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

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | RaggedKVCache | None = None
    ) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask, is_causal = None, True
        if kv_cache is not None:  # the cache knows which of its keys each new query may see
            mask, is_causal = kv_cache.mask, kv_cache.is_causal
            k, v = kv_cache.append(self.layer, k, v)  # (B, nh, past + T, hs)
        # Dispatches to flash / memory-efficient kernels where the device has them.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
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

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | RaggedKVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2. ``loss_slice``: with targets, compute the final LayerNorm, the head and the loss in
    slices of this many positions (SlicedHeadLoss), returning no logits; 0: all at once."""

    def __init__(self, config: GPTConfig, loss_slice: int = 0):
        super().__init__()
        self.loss_slice = loss_slice
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
        kv_cache: KVCache | RaggedKVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) and, with targets (B, T), the mean loss;
        with targets and ``loss_slice``, the logits are never all made and None is returned.

        Logits cover the real vocabulary only: padded rows of the embedding table exist for
        matmul speed and can never be predicted. Targets equal to -1 are ignored in the loss.

        With ``kv_cache``, ``idx`` continues the cached positions: its tokens sit at positions
        cache.length .. cache.length + T - 1 (a ragged cache: each row at its own length), attend
        to every cached key of their row, and are appended to the cache. Cached and uncached
        calls give the same logits (up to float rounding).

        ``last_only`` (generation, which reads the next token's logits only; no targets): the
        final LayerNorm and the head run on the last position alone, logits (B, 1, V). With
        GPT-2's 50,257-row head that is most of a short prompt's cost on a small model.
        """
        if last_only and targets is not None:
            raise ValueError("last_only gives one position's logits: it takes no targets")
        B, T = idx.size()
        if kv_cache is None:
            if T > self.config.block_size:
                raise ValueError(
                    f"sequence of length {T} exceeds block_size {self.config.block_size}"
                )
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        else:
            pos = kv_cache.prepare(B, T, idx.device)  # (T,) or, ragged, (B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is not None and self.loss_slice:
            return None, sliced_head_loss(x, self.transformer.ln_f, self.lm_head.weight, targets,
                                          self.config.vocab_size, self.loss_slice)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
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
