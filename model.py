"""LLaMA, written from scratch: the frozen language model LaVIN teaches to see.

Part 1 is the language model of Touvron et al. 2023 (LLaMA-1/2), with parameter names equal to
the keys of Meta's checkpoints so that loading is a strict `load_state_dict`:

    tokens ─tok_embeddings─> h ─┬─ n_layers x Block ──────────────────────────────┬─ norm ─ output ─> logits
                                │   h = h + attention(adapter_attn?(attention_norm(h)))
                                │   h = h + feed_forward(adapter_mlp?(ffn_norm(h)))
                                └─ (LaVIN passes ready embeddings instead of tokens)

The adapter slots stay empty for a plain LLaMA; LaVIN (adapter.py, router.py) fills them.
Attention uses grouped-query heads, Meta's rotary embedding (adjacent dims form a pair) and an
optional KV cache: batched prefill of left-padded prompts, then one-token decode steps, either by
`forward` or by `decode_step`, whose shapes never change (for torch.compile and CUDA graphs).

Part 2 loads Meta's layout (`params.json`, `consolidated.NN.pth` shards, `tokenizer.model`, read
by tokenizer.py) and the Hugging Face layout Vicuna ships (`config.json`, `pytorch_model*.bin` or
`*.safetensors`; llama_files.py reads both), one tensor at a time; with bits=4 or 8 the blocks'
linear layers are quantized (quant.py) as their weights stream in (LaVIN-lite).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from llama_files import Lazy, check_state, read_hf, read_meta
from quant import QuantLinear, quantize_
from tokenizer import Tokenizer, find_tokenizer, load_tokenizer


@dataclass
class ModelArgs:
    # Exactly the keys of Meta's params.json (LLaMA-1 and LLaMA-2).
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (no grouped-query attention)
    vocab_size: int = -1  # -1 in Meta's files: taken from the tokenizer
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False  # LLaMA-3.1 and 3.2: RoPE's long wavelengths stretched (scale_rope)
    # Not in params.json: LLaMA-3.1's RoPE scaling (Hugging Face's config.json states it as rope_scaling;
    # LLaMA-3.2's 1B and 3B take factor 32, which only their config.json says).
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192  # the context the model was first trained at
    # Mistral's config.json: how far back its attention reaches. This model attends to every one of its
    # max_seq_len positions, so it is exact while max_seq_len <= sliding_window (LaVIN's 512 vs 4096).
    sliding_window: int | None = None
    # LLaMA-3.2's 1B and 3B: the output head is the embedding matrix (config.json's key; llama_files
    # infers it for Meta's layout)
    tie_word_embeddings: bool = False
    max_seq_len: int = 2048  # longest sequence a KV cache is made for

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope_scaling(self) -> tuple | None:
        """(factor, low_freq_factor, high_freq_factor, original context) for scale_rope, or None."""
        if not self.use_scaled_rope:
            return None
        return (self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                self.rope_original_context)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(cls, params: dict, **overrides) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"params.json has keys this LLaMA does not know: {unknown}")
        return cls(**{**params, **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 as Meta does: fp16 sums of squares overflow.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def scale_rope(inv_freq: torch.Tensor, factor: float, low: float, high: float, context: int) -> torch.Tensor:
    """LLaMA-3.1's RoPE scaling: the frequencies whose wavelength fits context / high times in
    the original context are kept, those longer than context / low are divided by factor, and
    the ones between move smoothly from one to the other."""
    wavelength = 2 * math.pi / inv_freq
    s = ((context / wavelength - low) / (high - low)).clamp(0, 1)  # 0: long wavelengths, 1: short ones
    return (1 - s) * inv_freq / factor + s * inv_freq


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float, scaling: tuple | None = None):
    """Each position's rotation as the factors apply_rope multiplies by, made once per forward:
    cos = (c, c) and sin = (-s, s) for each pair of dims, each (..., T, 1, head_dim/2, 2), fp32.
    scaling: ModelArgs.rope_scaling (LLaMA-3.1 and 3.2), or None."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    if scaling is not None:
        inv_freq = scale_rope(inv_freq, *scaling)
    angles = positions.float()[..., None, None] * inv_freq  # (..., T, 1, hd/2)
    c, s = angles.cos(), angles.sin()
    return torch.stack((c, c), -1), torch.stack((-s, s), -1)  # each (..., T, 1, hd/2, 2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate dims (0,1), (2,3), ... of each head: Meta's complex-number form, in real arithmetic,
    (x0, x1) -> (x0 c - x1 s, x1 c + x0 s) = (x0, x1) * (c, c) + (x1, x0) * (-s, s)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    return (pairs * cos + pairs.flip(-1) * sin).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, rope=None, mask=None, kv=None, start=0, fixed_shapes: bool = False):
        """x (B, T, dim). rope: (cos, sin) from rope_angles, or None for no rotation (Llama.route's
        lone token, whose position is moot). kv: this layer's cache (k, v), written from slot
        `start` on. fixed_shapes: decode_step's way, start a (1,) tensor, every slot attended to."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        if kv is not None and fixed_shapes:  # Llama.decode_step: no shape depends on the step
            k_buf, v_buf = kv
            k_buf.index_copy_(2, start, k)  # into slot `start` (a (1,) tensor), in place
            v_buf.index_copy_(2, start, v)
            k, v = k_buf, v_buf  # every slot, (B, nkv, max_len, hd): the mask hides the unwritten
        elif kv is not None:  # write this step into the cache, attend to everything so far
            k_buf, v_buf = kv
            k_buf[:, :, start : start + T] = k
            v_buf[:, :, start : start + T] = v
            k, v = k_buf[:, :, : start + T], v_buf[:, :, : start + T]
        # mask None means plain causal; is_causal keeps SDPA on its fastest kernels. In a compiled
        # block T may be symbolic and SDPA refuses a symbolic flag (a graph break): branch on it.
        causal = True if mask is None and T > 1 else False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, nh*hd) -> (B, T, dim)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


# `routes`: how a block's adapters get the router weights that mix their two paths. Either one
# (w_attn, w_mlp) pair per block, read off LaVIN's modality token (LaVIN.routes), or one of:
EACH_TOKEN = "each token"  # every adapter routes each token on its own hidden state (Llama.route)
ONE_PATH = "one path"  # the adapters have one path and no router (LaVIN --no_router): nothing to mix
NO_ADAPTERS = "no adapters"  # a plain LLaMA, or LaVIN whose routing is folded into the weights (LaVIN.fold)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Slots for LaVIN's mixture-of-modality adapters (adapter.py); empty for a plain LLaMA.
        self.adapter_attn: nn.Module | None = None
        self.adapter_mlp: nn.Module | None = None

    def forward(self, x, rope=None, mask=None, kv=None, start=0, routes=NO_ADAPTERS, fixed_shapes: bool = False,
                recompute: bool = False):
        """x (B, T, dim); routes: this block's (w_attn, w_mlp), each (B, 1, 2), or a name above; the
        rest as Attention takes them. Returns (x, the router weights used). recompute: keep only x
        and run the block again in the backward pass (gradient checkpointing), decided here so that
        a compiled block compiles it too."""
        if recompute:
            return checkpoint(self.layer, x, rope, mask, kv, start, routes, fixed_shapes, use_reentrant=False)
        return self.layer(x, rope, mask, kv, start, routes, fixed_shapes)

    def layer(self, x, rope, mask, kv, start, routes, fixed_shapes):
        h, w_attn = adapt(self.adapter_attn, self.attention_norm(x), routes, 0)
        x = x + self.attention(h, rope, mask, kv, start, fixed_shapes)
        h, w_mlp = adapt(self.adapter_mlp, self.ffn_norm(x), routes, 1)
        return x + self.feed_forward(h), (w_attn, w_mlp)


def adapt(adapter, h, routes, slot: int):
    """h (B, T, dim) through one adapter slot (0: before attention, 1: before the feed-forward), its
    paths mixed as `routes` says. Returns (h, the router weights used, or None)."""
    if adapter is None or routes == ONE_PATH:
        return h if adapter is None else adapter(h), None
    if routes == NO_ADAPTERS:
        raise ValueError("this block holds an adapter: routes=NO_ADAPTERS gives it no router weights")
    w = adapter.route(h) if routes == EACH_TOKEN else routes[slot]  # else: the modality token's pair
    return adapter(h, w), w


def per_block(routes, layers) -> list:
    return [routes] * len(layers) if isinstance(routes, str) else routes  # a name holds for every block


class KVCache:
    """Keys and values of every layer, for generation.

    A batch of prompts of different lengths is left-padded: sample b's first pad[b] slots hold
    padding that no query may see, and its positions count from its first real token.
    """

    def __init__(self, args: ModelArgs, batch: int, max_len: int | None = None, pad=None,
                 device=None, dtype=torch.float32):
        max_len = max_len or args.max_seq_len
        shape = (batch, args.kv_heads, max_len, args.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.max_len = max_len
        self.reset(pad)  # zeroes them

    def reset(self, pad=None):
        """Empty the cache for a new batch of as many rows, keeping its tensors where they are
        (a captured CUDA graph reads them at their addresses)."""
        batch, device = self.k[0].shape[0], self.k[0].device
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else \
            torch.as_tensor(pad, dtype=torch.long, device=device)
        self.padded = bool((self.pad > 0).any())  # decided once, so decode steps never sync
        self.len = 0  # slots filled so far
        for t in self.k + self.v:  # decode_step masks stale slots, but 0 * NaN is still NaN
            t.zero_()


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size is unset (-1): take it from the tokenizer first")
        if args.dim % args.n_heads or args.n_heads % args.kv_heads:
            raise ValueError(f"dim {args.dim}, n_heads {args.n_heads} and n_kv_heads "
                             f"{args.kv_heads} do not divide evenly")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.grad_checkpointing = False  # recompute each block in the backward pass (training)

    def forward(self, tokens=None, embeds=None, cache: KVCache | None = None, routes=NO_ADAPTERS,
                pos_offset: int = 0, head: bool = True):
        """Logits (B, T, vocab) for token ids (B, T) or ready embeddings (B, T, dim); with
        head=False the last block's hidden states (B, T, dim) instead, before norm and output
        (a trainer applies them to the few positions that carry loss).

        cache: a KVCache to read and extend (prefill, then one token per step).
        routes: one (w_attn, w_mlp) per block, as `route` returns them (LaVIN), or one of EACH_TOKEN,
        ONE_PATH, NO_ADAPTERS (a plain LLaMA) for every block.
        pos_offset: position of the first token (LaVIN's text starts at 1, after its modality
        token, which it runs through `route` instead).
        """
        h = self.tok_embeddings(tokens) if embeds is None else embeds
        B, T, _ = h.shape
        start = cache.len if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} asked for")
        slots = torch.arange(start, start + T, device=h.device)
        positions = slots + pos_offset  # (T,)
        mask = None  # plain causal
        if cache is not None and cache.padded:
            positions = (slots[None] - cache.pad[:, None]).clamp(min=0) + pos_offset  # (B, T)
        if cache is not None and (cache.padded or (start > 0 and T > 1)):
            keys = torch.arange(start + T, device=h.device)
            mask = (keys[None, :] <= slots[:, None])[None, None]  # (1, 1, T, S): causal
            real = keys[None, None, None, :] >= cache.pad[:, None, None, None]  # (B, 1, 1, S)
            # A padding query sees itself: some SDPA kernels give NaN for a row with no key to see.
            mask = mask & (real | (keys[None, :] == slots[:, None])[None, None])  # (B, 1, T, S)
        # each ([B,] T, 1, hd/2, 2)
        rope = rope_angles(positions, self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, (layer, r) in enumerate(zip(self.layers, per_block(routes, self.layers))):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            h, _ = layer(h, rope, mask, kv, start, r, recompute=recompute)
        if cache is not None:
            cache.len += T
        return self.output(self.norm(h)) if head else h

    def decode_step(self, embeds, cache: KVCache, slot: torch.Tensor, routes=NO_ADAPTERS, pos_offset: int = 0):
        """Logits (B, vocab) of one token per row, embeds (B, 1, dim), written at cache slot
        `slot` (a (1,) long tensor on the model's device) after a prefill by `forward`.

        `forward` attends to the slots filled so far, so its shapes grow with every step. Here no
        shape ever changes, so torch.compile can capture the step once as a CUDA graph: the token
        attends to all cache.max_len slots, and a mask hides those not written yet and each row's
        left padding. The caller advances cache.len (a Python int read here would be compiled in).
        """
        keys = torch.arange(cache.max_len, device=embeds.device)  # (S,)
        mask = (keys <= slot) & (keys >= cache.pad[:, None])  # (B, S): written, and not padding
        positions = (slot - cache.pad)[:, None] + pos_offset  # (B, 1): counted from the first real token
        # each (B, 1, 1, hd/2, 2)
        rope = rope_angles(positions, self.args.head_dim, self.args.rope_theta, self.args.rope_scaling)
        h = embeds
        for i, (layer, r) in enumerate(zip(self.layers, per_block(routes, self.layers))):
            h, _ = layer(h, rope, mask[:, None, None], (cache.k[i], cache.v[i]), slot, r, fixed_shapes=True)
        return self.output(self.norm(h[:, -1]))

    def route(self, m: torch.Tensor) -> list:
        """Run single tokens m (B, 1, dim) through every block on their own and return the router
        weights each block's adapters chose. LaVIN's modality token sees only itself, so this is
        all it does; the text then runs on the causal fast path with these weights."""
        routes = []
        for layer in self.layers:  # no rotation: a token attending to itself alone gets its own value
            m, r = layer(m, rope=None, routes=EACH_TOKEN)
            routes.append(r)
        return routes


# ----------------------------------------------------------------------------- checkpoint loading

def load_llama(folder, dtype=torch.float32, device="cpu", max_seq_len: int = 2048, bits: int = 16):
    """(Llama, Tokenizer) from a checkpoint folder in Meta's or Hugging Face's layout.

    Weights are memory-mapped and moved tensor by tensor into a model built on the meta device,
    so at no point do two copies of the weights exist. bits=4 (NF4, LaVIN-lite) or 8 (int8)
    quantizes every linear layer of the blocks as its weight arrives, on `device`: the host then
    holds the quantized model plus one tensor at 16 bits. The model comes back in eval mode.
    """
    folder = Path(folder)
    if (folder / "params.json").is_file():
        params, state, described = *read_meta(folder), "params.json"
    elif (folder / "config.json").is_file():
        params, state, described = *read_hf(folder), "config.json"
    elif not folder.is_dir():
        raise FileNotFoundError(f"no LLaMA checkpoint folder at {folder}")
    else:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"{folder} holds neither Meta's layout (params.json + consolidated.NN.pth) nor Hugging "
            f"Face's (config.json + pytorch_model*.bin or *.safetensors): it holds "
            f"{', '.join(found[:8]) + (' ...' if len(found) > 8 else '') if found else 'nothing'}")
    tokenizer = load_tokenizer(find_tokenizer(folder))  # sentencepiece or LLaMA-3's ranks, as the file holds
    args = ModelArgs.from_params(params, max_seq_len=max_seq_len)
    if args.sliding_window is not None and max_seq_len > args.sliding_window:
        raise ValueError(f"{folder}: its attention reaches back {args.sliding_window} positions (config.json's "
                         f"sliding_window) and max_seq_len {max_seq_len} would attend past them: give at most "
                         f"{args.sliding_window}")
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    if args.tie_word_embeddings and "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]  # what the model's state_dict lists under both names
    with torch.device("meta"):
        model = Llama(args)
    load_strict(model, state, dtype, device, bits, source=f"{folder}'s weights against its {described}")
    if args.tie_word_embeddings:  # loading assigned each name its own tensor: one matrix again
        model.output.weight = model.tok_embeddings.weight
    return model.eval(), tokenizer


def load_strict(model: nn.Module, state: dict, dtype, device, bits: int = 16, source: str = "checkpoint"):
    """load_state_dict(assign=True) after checking every key and shape (an error names source, the
    key and both shapes); with bits 4 or 8 the blocks' linear layers become quantized ones, filled
    as their weights arrive."""
    check_state(model.state_dict(), state, source)
    quantize_(model.layers, bits, dtype)  # empty QuantLinears on the meta device; 16 bits: nothing
    quantized = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    # Tensor by tensor, so only one converted tensor exists beside the memory-mapped files.
    loaded = {}
    for key in list(state):
        t = state.pop(key)
        t = (t.make() if isinstance(t, Lazy) else t).to(device)
        if key in quantized:  # from the file's own precision (fp16 in Meta's), as bitsandbytes does
            quantized[key].quantize_(t)
        else:
            loaded[key] = t.to(dtype)
    model.load_state_dict(loaded, strict=not quantized, assign=True)  # every key was checked above
