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
`*.safetensors`), one tensor at a time; with bits=4 or 8 the blocks' linear layers are quantized
(quant.py) as their weights stream in (LaVIN-lite).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from quant import QuantLinear, quantize_
from tokenizer import Tokenizer, find_tokenizer


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
    # Not in params.json.
    max_seq_len: int = 2048  # longest sequence a KV cache is made for

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float):
    """Each position's rotation as the factors apply_rope multiplies by, made once per forward:
    cos = (c, c) and sin = (-s, s) for each pair of dims, each (..., T, 1, head_dim/2, 2), fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
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

    def forward(self, x, cos, sin, mask=None, kv=None, start=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if cos is not None:  # None: no rotation (Llama.route's lone token, whose position is moot)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        if kv is not None and isinstance(start, torch.Tensor):  # Llama.decode_step: fixed shapes
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

    def forward(self, x, cos, sin, mask=None, kv=None, start=0, routes=None, recompute: bool = False):
        """routes: this block's router weights (attn, mlp), each (B, 1, 2), or None to let every
        adapter route each token on its own hidden state. Returns (x, the routes used). recompute:
        keep only x and run the block again in the backward pass (gradient checkpointing), decided
        inside the block so that a compiled block compiles the recomputation too."""
        if recompute:
            return checkpoint(self.layer, x, cos, sin, mask, kv, start, routes, use_reentrant=False)
        return self.layer(x, cos, sin, mask, kv, start, routes)

    def layer(self, x, cos, sin, mask=None, kv=None, start=0, routes=None):
        w_attn = w_mlp = None
        h = self.attention_norm(x)
        if self.adapter_attn is not None:
            w_attn = routes[0] if routes is not None else self.adapter_attn.expert_weights(h)
            h = self.adapter_attn(h, w_attn)
        x = x + self.attention(h, cos, sin, mask, kv, start)
        h = self.ffn_norm(x)
        if self.adapter_mlp is not None:
            w_mlp = routes[1] if routes is not None else self.adapter_mlp.expert_weights(h)
            h = self.adapter_mlp(h, w_mlp)
        return x + self.feed_forward(h), (w_attn, w_mlp)


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
        self.grad_checkpointing = False  # recompute each block in the backward pass (training)

    def forward(self, tokens=None, embeds=None, cache: KVCache | None = None, routes=None,
                pos_offset: int = 0, head: bool = True):
        """Logits (B, T, vocab) for token ids (B, T) or ready embeddings (B, T, dim); with
        head=False the last block's hidden states (B, T, dim) instead, before norm and output
        (a trainer applies them to the few positions that carry loss).

        cache: a KVCache to read and extend (prefill, then one token per step).
        routes: router weights per layer, as `route` returns them (LaVIN); None for plain LLaMA.
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
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)  # ([B,] T, 1, hd/2, 2)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            r = routes[i] if routes is not None else None
            h, _ = layer(h, cos, sin, mask, kv, start, r, recompute)
        if cache is not None:
            cache.len += T
        return self.output(self.norm(h)) if head else h

    def decode_step(self, embeds, cache: KVCache, slot: torch.Tensor, routes=None, pos_offset: int = 0):
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
        cos, sin = rope_angles(positions, self.args.head_dim, self.args.rope_theta)  # (B, 1, 1, hd/2, 2)
        h = embeds
        for i, layer in enumerate(self.layers):
            r = routes[i] if routes is not None else None
            h, _ = layer(h, cos, sin, mask[:, None, None], (cache.k[i], cache.v[i]), slot, r)
        return self.output(self.norm(h[:, -1]))

    def route(self, m: torch.Tensor) -> list:
        """Run single tokens m (B, 1, dim) through every block on their own and return the router
        weights each block's adapters chose. LaVIN's modality token sees only itself, so this is
        all it does; the text then runs on the causal fast path with these weights."""
        routes = []
        for layer in self.layers:  # no rotation: a token attending to itself alone gets its own value
            m, r = layer(m, None, None)
            routes.append(r)
        return routes


# ----------------------------------------------------------------------------- checkpoint loading

# Meta's model-parallel shards split each weight along one dim; norms are copied to every shard.
SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
SKIPPED_KEYS = {"rope.freqs"}  # LLaMA-1 files carry the rotary table; we compute it


def shard_dim(key: str) -> int | None:
    name = key.rsplit(".", 2)[-2]  # "layers.0.attention.wq.weight" -> "wq"
    return SHARD_DIM.get(name)


def load_llama(folder, dtype=torch.float32, device="cpu", max_seq_len: int = 2048, bits: int = 16):
    """(Llama, Tokenizer) from a checkpoint folder in Meta's or Hugging Face's layout.

    Weights are memory-mapped and moved tensor by tensor into a model built on the meta device,
    so at no point do two copies of the weights exist. bits=4 (NF4, LaVIN-lite) or 8 (int8)
    quantizes every linear layer of the blocks as its weight arrives, on `device`: the host then
    holds the quantized model plus one tensor at 16 bits. The model comes back in eval mode.
    """
    folder = Path(folder)
    if (folder / "params.json").is_file():
        args, state = read_meta(folder)
    elif (folder / "config.json").is_file():
        args, state = read_hf(folder)
    elif not folder.is_dir():
        raise FileNotFoundError(f"no LLaMA checkpoint folder at {folder}")
    else:
        raise FileNotFoundError(
            f"{folder} holds neither Meta's layout (params.json + consolidated.NN.pth) nor Hugging "
            f"Face's (config.json + pytorch_model*.bin or *.safetensors)")
    tokenizer = Tokenizer(find_tokenizer(folder))
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    args.max_seq_len = max_seq_len
    with torch.device("meta"):
        model = Llama(args)
    load_strict(model, state, dtype, device, bits)
    return model.eval(), tokenizer


def check_state(expected: dict, state: dict, source: str = "checkpoint"):
    """Raise, naming the keys or the key and both shapes, unless state fits expected exactly."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        cut = lambda keys: f"{keys[:20]}{' ...' if len(keys) > 20 else ''}"  # noqa: E731
        raise KeyError(f"{source} does not fit the model: missing keys {cut(missing)}, "
                       f"unexpected keys {cut(unexpected)}")
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, the model's is "
                             f"{tuple(want.shape)}")


class Lazy:
    """A checkpoint tensor made only when the loader takes it (a merge of shards, HF's row
    permutation, a safetensors read): the loader then holds one such tensor at a time."""

    def __init__(self, shape, make):
        self.shape, self.make = torch.Size(shape), make


def load_strict(model: nn.Module, state: dict, dtype, device, bits: int = 16):
    """load_state_dict(assign=True) after checking every key and shape; with bits 4 or 8 the
    blocks' linear layers become quantized ones, filled as their weights arrive."""
    check_state(model.state_dict(), state)
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


def read_meta(folder: Path):
    """ModelArgs and a lazily merged state dict from params.json + consolidated.NN.pth."""
    args = ModelArgs.from_params(json.loads((folder / "params.json").read_text()))
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise FileNotFoundError(f"{folder} has params.json but no consolidated.NN.pth shard")
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in paths]
    for shard in shards:
        for key in SKIPPED_KEYS:
            shard.pop(key, None)
    keys = set(shards[0])
    for p, shard in zip(paths[1:], shards[1:]):
        if set(shard) != keys:
            raise ValueError(f"shards disagree: {p.name} has keys {sorted(set(shard) ^ keys)[:10]} "
                             f"that {paths[0].name} does not, or lacks them")
    state = {}
    for key in sorted(keys):
        parts = [s[key] for s in shards]
        dim = shard_dim(key)
        if dim is None:  # copied to every shard: they must agree
            for p, t in zip(paths[1:], parts[1:]):
                if t.shape != parts[0].shape or not torch.equal(t, parts[0]):
                    raise ValueError(f"shards disagree on {key}: {paths[0].name} and {p.name} differ")
            state[key] = parts[0]
        else:
            for p, t in zip(paths[1:], parts[1:]):
                other = [s for i, s in enumerate(t.shape) if i != dim]
                if other != [s for i, s in enumerate(parts[0].shape) if i != dim]:
                    raise ValueError(f"shards disagree on {key}: {paths[0].name} has shape "
                                     f"{tuple(parts[0].shape)}, {p.name} {tuple(t.shape)}")
            shape = list(parts[0].shape)
            shape[dim] = sum(t.shape[dim] for t in parts)
            merge = lambda parts=parts, dim=dim: torch.cat(parts, dim)  # noqa: E731
            state[key] = parts[0] if len(parts) == 1 else Lazy(shape, merge)
    return args, state


HF_NAMES = {  # Hugging Face name -> Meta name, per layer
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the row permutation HF's converter applies to wq/wk for its rotate-half RoPE: in each
    head, HF holds all first halves of the rotary pairs, then all second halves; Meta interleaves."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def read_hf(folder: Path):
    """ModelArgs and a Meta-named state dict from config.json + pytorch_model*.bin / *.safetensors."""
    cfg = json.loads((folder / "config.json").read_text())
    dim, inter = cfg["hidden_size"], cfg["intermediate_size"]
    # HF states the FFN width outright. multiple_of = width rounds int(8*dim/3) (scaled down by
    # ffn_dim_multiplier if it is bigger) up to exactly that width.
    base = int(2 * 4 * dim / 3)
    args = ModelArgs(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
        multiple_of=inter, ffn_dim_multiplier=None if base <= inter else inter / base,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0))
    assert args.ffn_hidden == inter
    bins = sorted(folder.glob("pytorch_model*.bin"))
    tensors = sorted(folder.glob("*.safetensors"))
    raw = {}
    if bins:
        for p in bins:
            raw.update(torch.load(p, map_location="cpu", mmap=True, weights_only=True))
    elif tensors:
        try:
            from safetensors import safe_open
        except ImportError as e:
            raise ImportError(f"{folder} holds *.safetensors: pip install safetensors to read them") from e
        for p in tensors:
            f = safe_open(p, framework="pt")  # read a tensor when it is asked for
            raw.update({k: Lazy(f.get_slice(k).get_shape(), lambda f=f, k=k: f.get_tensor(k)) for k in f.keys()})
    else:
        raise FileNotFoundError(f"{folder} has config.json but no pytorch_model*.bin or *.safetensors")
    state = {}
    for key, t in raw.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # derived, some exports include it
        if key == "model.embed_tokens.weight":
            state["tok_embeddings.weight"] = t
        elif key == "model.norm.weight":
            state["norm.weight"] = t
        elif key == "lm_head.weight":
            state["output.weight"] = t
        elif key.startswith("model.layers."):
            i, rest = key[len("model.layers."):].split(".", 1)
            name, suffix = rest.rsplit(".", 1)
            if name not in HF_NAMES:
                state[key] = t  # load_strict reports it as unexpected
                continue
            if name in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = args.n_heads if name == "self_attn.q_proj" else args.kv_heads
                t = Lazy(t.shape, lambda t=t, heads=heads: unpermute(t.make() if isinstance(t, Lazy) else t, heads))
            state[f"layers.{i}.{HF_NAMES[name]}.{suffix}"] = t
        else:
            state[key] = t
    return args, state
