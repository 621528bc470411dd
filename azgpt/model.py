"""The GPT: a NanoGPT-style decoder-only transformer, in two flavours (`model.arch`).

"gpt2" (the default): token + learned position embeddings, pre-LayerNorm blocks of causal
self-attention (`scaled_dot_product_attention`, flash kernels on GPU) and a GELU MLP, a final
LayerNorm and an `lm_head` tied to the token embedding. Parameter names follow GPT-2's
(`transformer.wte`, `transformer.h.N.attn.c_attn`, `lm_head`) so export to transformers is a
key map.

"llama": the same skeleton with the changes Llama-family models made: rotary position
embeddings applied to queries and keys (no `wpe`), RMSNorm, a SwiGLU MLP, no biases, and
optionally grouped-query attention (`n_kv_head`), RMSNorm on queries and keys (`qk_norm`) and an
untied head. Separate `c_q`/`c_k`/`c_v` and `c_gate`/`c_fc` matrices (rather than fused ones)
so Muon orthogonalises each projection on its own and export maps one tensor to one tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from .config import ModelConfig as GPTConfig  # the model section of a run file

__all__ = ["GPT", "GPTConfig", "KVCache"]


class KVCache:
    """Keys and values of earlier positions, for every layer, preallocated.

    `k[i]`, `v[i]`: (B, n_head, max_len, head_size) for layer i; `lengths`: (B,) how many
    positions each row holds. Rows advance independently, so one batch can hold sequences of
    different lengths (serving batches requests that started at different times): a forward
    with a cache writes the T new positions of row b at `lengths[b] ... lengths[b] + T - 1` and
    attends only to that row's filled positions.

    `lengths` lives on the host whatever the device: positions, the fullness check and the
    attention mask of a step are computed from it once per forward (`begin`), never by reading
    a device tensor back (the old per-layer `int(pos.max())` was one sync per layer per token).
    """

    def __init__(
        self,
        cfg: GPTConfig,
        batch: int,
        max_len: int | None = None,
        *,
        device=None,
        dtype=torch.float32,
    ):
        self.max_len = max_len or cfg.block_size
        hs = cfg.n_embd // cfg.n_head
        # One tensor (B, n_layer, 2, kv_heads, max_len, hs): keys [:, i, 0], values [:, i, 1]
        # (llama's grouped-query heads share), so moving a row or storing one decoding step's
        # keys and values of every layer is one copy.
        self.kv = torch.zeros(
            (batch, cfg.n_layer, 2, cfg.kv_heads, self.max_len, hs), device=device, dtype=dtype
        )
        self.lengths = torch.zeros(batch, dtype=torch.long)  # host memory, see above
        self._step: tuple | None = None

    @staticmethod
    def nbytes(cfg: GPTConfig, batch: int, max_len: int, dtype=torch.float32) -> int:
        """Bytes a cache of `batch` rows and `max_len` positions takes, before allocating it."""
        hs = cfg.n_embd // cfg.n_head
        per = batch * cfg.kv_heads * max_len * hs * torch.empty(0, dtype=dtype).element_size()
        return 2 * cfg.n_layer * per

    @property
    def k(self) -> list[torch.Tensor]:
        """Each layer's keys (B, kv_heads, max_len, hs), views of `kv`."""
        return list(self.kv[:, :, 0].unbind(1))

    @property
    def v(self) -> list[torch.Tensor]:
        return list(self.kv[:, :, 1].unbind(1))

    @property
    def batch(self) -> int:
        return self.lengths.numel()

    def view(self, start: int, n: int, upto: int) -> KVCache:
        """Rows start..start+n-1 and the first `upto` positions, sharing storage and lengths
        (writes land here). Attention then spans only the filled positions: for the gpt100m
        shape at batch 8 and ~60 filled of 512 positions, attention over all 512 was 22% of a
        decoding step."""
        out = KVCache.__new__(KVCache)
        out.max_len = upto
        out.kv = self.kv[start : start + n, :, :, :, :upto]
        out.lengths = self.lengths[start : start + n]
        out._step = None
        return out

    def reset(self, row: int | None = None) -> None:
        """Forget row `row` (or every row); its slots are overwritten by the next writes."""
        if row is None:
            self.lengths.zero_()
        else:
            self.lengths[row] = 0

    def copy_row(self, src: KVCache, src_row: int, dst_row: int) -> None:
        """Put row `src_row` of another cache (e.g. a prompt prefilled alone) into `dst_row`."""
        n = int(src.lengths[src_row])
        self.kv[dst_row, :, :, :, :n] = src.kv[src_row, :, :, :, :n]
        self.lengths[dst_row] = n

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange two rows (their filled positions and lengths)."""
        if a == b:
            return
        la, lb = int(self.lengths[a]), int(self.lengths[b])
        kv = self.kv
        tmp = kv[a, :, :, :, :la].clone()
        kv[a, :, :, :, :lb] = kv[b, :, :, :, :lb]
        kv[b, :, :, :, :la] = tmp
        self.lengths[a], self.lengths[b] = lb, la

    def begin(self, T: int, device, limit: int | None = None) -> torch.Tensor:
        """Prepare a forward of T new tokens per row: returns their positions (B, T) on
        `device` and keeps them with the boolean attention mask (B, 1, T, max_len) of what
        each new query may see (its own row, causal) for every layer's `write`. `limit`: the
        model's context, which no position may reach."""
        top = int(self.lengths.max()) + T if self.batch else T
        if limit is not None and top > limit:
            raise ValueError(f"sequence of {top} tokens is longer than the model's context {limit}")
        if top > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        pos = (self.lengths[:, None] + torch.arange(T)).to(device)  # (B, T), built on the host
        keys = torch.arange(self.max_len, device=device)
        mask = (keys[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, max_len)
        rows = torch.arange(self.batch, device=device)[:, None]  # (B, 1)
        self._step = (pos, rows, mask)
        return pos

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's (B, nh, T, hs) keys/values; return the full cache of the layer and
        the mask `begin` built."""
        pos, rows, mask = self._step
        # Advanced indices on dims 0 and 4 put (B, T) first: (B, T, nh, hs). Views are taken
        # afresh from `kv` (a test's forward with autograd on writes into it).
        self.kv[rows, layer, 0, :, pos] = k.transpose(1, 2)
        self.kv[rows, layer, 1, :, pos] = v.transpose(1, 2)
        return self.kv[:, layer, 0], self.kv[:, layer, 1], mask

    def attend(self, layer: int, q, k, v, gqa: dict) -> torch.Tensor:
        """Attention of this step's queries q (B, nh, T, hs) over the row's cached positions
        and the new keys/values k, v (stored first)."""
        k, v, mask = self.write(layer, k.to(self.kv.dtype), v.to(self.kv.dtype))
        return F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, **gqa
        )

    def advance(self, n) -> None:
        """Add n (an int, or a (B,) host tensor of per-row counts) to the rows' lengths."""
        self.lengths += n
        self._step = None


def packed_positions(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows of packed sequences (segment ids (B, T), a new id where a sequence starts):
    each token's position within its own sequence (B, T), and the boolean attention mask
    (B, 1, T, T) that is causal and block-diagonal, so no sequence sees another. Each packed
    sequence then computes exactly what it computes alone (tests/test_finetune.py)."""
    B, T = segments.shape
    ar = torch.arange(T, device=segments.device).expand(B, T)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(start, ar, torch.zeros_like(ar)).cummax(dim=1).values
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ar - first, (same & causal)[:, None]


RMS_EPS = 1e-5  # llama's RMSNorm epsilon (exported as rms_norm_eps)


def rotary(pos: torch.Tensor, head_size: int, theta: float, dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin (P, 1, T, hs) of rotary embeddings for positions `pos` (P, T), P = 1 or B.

    Frequencies theta^(-2i/hs) in fp32, repeated over both halves of the head (the "rotate
    half" layout of transformers' Llama/Qwen3), so exported weights need no permutation."""
    inv = 1.0 / (theta ** (torch.arange(0, head_size, 2, device=pos.device).float() / head_size))
    f = pos[..., None].float() * inv  # (P, T, hs/2)
    emb = torch.cat([f, f], dim=-1)[:, None]  # (P, 1, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) by its position's angle; the
    dot product of a rotated query and key then depends only on their distance."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.llama = cfg.arch == "llama"
        if self.llama:
            hs = cfg.n_embd // cfg.n_head
            self.n_kv_head = cfg.kv_heads
            self.c_q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
            self.c_k = nn.Linear(cfg.n_embd, self.n_kv_head * hs, bias=False)
            self.c_v = nn.Linear(cfg.n_embd, self.n_kv_head * hs, bias=False)
            self.qk_norm = cfg.qk_norm
            if cfg.qk_norm:
                self.q_norm = nn.RMSNorm(hs, eps=RMS_EPS)
                self.k_norm = nn.RMSNorm(hs, eps=RMS_EPS)
        else:
            self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias and not self.llama)
        self.c_proj.residual_scale = True
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, rope=None, mask=None
    ):
        B, T, C = x.shape
        hs = C // self.n_head
        gqa = {}
        if self.llama:
            q = self.c_q(x).view(B, T, self.n_head, hs)
            k = self.c_k(x).view(B, T, self.n_kv_head, hs)
            v = self.c_v(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rotary(q.transpose(1, 2), *rope)  # (B, nh, T, hs)
            k = apply_rotary(k.transpose(1, 2), *rope)  # (B, n_kv_head, T, hs)
            if self.n_kv_head != self.n_head:
                gqa = {"enable_gqa": True}  # each key/value head serves n_head/n_kv_head queries
        else:
            q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
            q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.n_head, hs).transpose(1, 2)
            v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,  # packed rows: block-diagonal and causal (see GPT.forward)
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None,
                **gqa,
            )
        else:
            # Generation: attend to this row's cached positions and the new ones (the cache
            # knows how: KVCache, or azgpt.decode_graph's one-row step).
            y = cache.attend(layer, q, k, v, gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.llama = cfg.arch == "llama"
        hidden, bias = cfg.ffn_hidden, cfg.bias and not self.llama
        if self.llama:
            self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=bias)
        self.c_proj.residual_scale = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.llama:  # SwiGLU: silu(gate) * up
            return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))
        # tanh GELU, as GPT-2 (and transformers' "gelu_new"), so exported logits match.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


def norm(cfg: GPTConfig) -> nn.Module:
    if cfg.arch == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=RMS_EPS)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, rope=None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, rope, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.llama = cfg.arch == "llama"
        parts = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if not self.llama:
            parts["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        parts.update(
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=norm(cfg),
        )
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 initialisation: N(0, 0.02) for linear and embedding weights, zero biases, and
        residual projections (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2 * n_layer) so the
        residual stream's variance does not grow with depth."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights count once
        # Linears repacked for CPU generation (azgpt.cpu_linear) hold no Parameters.
        n += sum(getattr(m, "n_params", 0) for m in self.modules())
        if non_embedding and not self.llama:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N for the matmuls plus 12 * L * d * T for attention (the
        score and value products span n_head * head_size = d with grouped-query attention too).
        An untied input embedding is a lookup, not a matmul, so it is not counted."""
        c = self.config
        n = self.num_params()
        if not c.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        last_only: bool = False,
        segments: torch.Tensor | None = None,
        n_new: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One contract. With `targets` (B, T): the mean cross-entropy (ignore_index -1) and
        nothing else, so no (B, T, vocab) tensor leaves the training forward (Accelerate's
        mixed-precision wrapper upcasts every output to fp32: at 32 x 1024 x 32000 that was a
        4.2 GB copy per micro-step). Without targets: the logits (B, T, V), or (B, 1, V) with
        `last_only`. With a `cache`, idx holds each row's next tokens; positions continue from
        `cache.lengths` and the cache advances by T. With `segments` (B, T) integers, a row
        holds several sequences packed end to end (fine-tuning): positions restart at each
        change of segment id and a token attends only to earlier tokens of its own segment.
        With a cache, `n_new` (B,) on the host: row b holds n_new[b] real tokens, the rest of
        its T padding; it advances by n_new[b] and `last_only` returns its last real position.
        """
        B, T = idx.shape
        mask = None
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(
                    f"sequence of {T} tokens is longer than the model's context {self.config.block_size}"
                )
            pos = torch.arange(T, dtype=torch.long, device=idx.device)[None]  # (1, T)
            if segments is not None:
                pos, mask = packed_positions(segments)
        else:
            # (B, T), from the lengths on the host; the mask is built here once per step.
            pos = cache.begin(T, idx.device, self.config.block_size)
        rope = None
        if self.llama:  # positions enter as rotations of queries and keys, per row with a cache
            c = self.config
            dtype = self.transformer.wte.weight.dtype  # a quantized lm_head has no weight
            rope = rotary(pos, c.n_embd // c.n_head, c.rope_theta, dtype)
            x = self.transformer.drop(self.transformer.wte(idx))
        else:
            x = self.transformer.drop(
                self.transformer.wte(idx) + self.transformer.wpe(pos)
            )  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, rope, mask)
        if cache is not None:
            cache.advance(T if n_new is None else n_new)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            # fp32 cross-entropy; under torch.compile the upcast fuses into the softmax kernel.
            return F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        if last_only:
            if n_new is None:
                x = x[:, -1:, :]
            else:
                x = x[torch.arange(B, device=x.device), n_new.to(x.device) - 1][:, None]
        return self.lm_head(x)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ):
        """Yield one (B, 1) tensor of new token ids per step. temperature 0 is greedy decoding.

        The sampler and the context policy are `azgpt.generate`'s (the ones `azgpt sample` and
        `azgpt serve` use): once the context is full, its last half is prefilled again."""
        from .generate import SamplingParams, generate_tokens

        params = SamplingParams(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
        yield from generate_tokens(self, idx, max_new_tokens, params, generator, eos_id, use_cache)
