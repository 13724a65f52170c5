"""Reading LLaMA checkpoint files, for model.load_llama: Meta's layout (`params.json` and the
model-parallel shards `consolidated.NN.pth`) and Hugging Face's (`config.json` and
`pytorch_model*.bin` or `*.safetensors`), into Meta's parameter names. Each reader returns the
fields of model.ModelArgs and a state dict whose big tensors are memory-mapped, or `Lazy`: made
only when the loader takes them, so no second copy of the weights ever exists.
"""
import json
from pathlib import Path

import torch


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


# Meta's model-parallel shards split each weight along one dim; norms are copied to every shard.
SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
SKIPPED_KEYS = {"rope.freqs"}  # LLaMA-1 files carry the rotary table; we compute it
# (dim, n_layers) of LLaMA-3.2-1B and -3B, whose params.json states neither their RoPE factor, 32 (Meta's
# reference code hard-coded 8; 32 is right, as their config.json says: meta-llama/llama-models #166, #241),
# nor that their output head is the embedding (when the file holds no output.weight)
LLAMA32_SMALL = {(2048, 16), (3072, 28)}


def shard_dim(key: str) -> int | None:
    name = key.rsplit(".", 2)[-2]  # "layers.0.attention.wq.weight" -> "wq"
    return SHARD_DIM.get(name)


def read_meta(folder: Path):
    """params.json's dict and a lazily merged state dict from params.json + consolidated.NN.pth."""
    params = json.loads((folder / "params.json").read_text())
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
    if params.get("use_scaled_rope") and (params.get("dim"), params.get("n_layers")) in LLAMA32_SMALL:
        params = {"rope_scaling_factor": 32.0, **params, "tie_word_embeddings": "output.weight" not in state}
    return params, state


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


def rope_scaling(scaling: dict | None, folder: Path) -> dict:
    """ModelArgs' RoPE-scaling fields from config.json's rope_scaling: LLaMA-3.1's ("llama3"), or
    none; another kind (linear, dynamic, yarn) is refused rather than read as something else."""
    if not scaling:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"{folder}/config.json: rope_scaling of type {kind!r}; this LLaMA reads LLaMA-3.1's "
                         f"('llama3') only")
    return dict(use_scaled_rope=True, rope_scaling_factor=scaling["factor"],
                rope_low_freq_factor=scaling["low_freq_factor"], rope_high_freq_factor=scaling["high_freq_factor"],
                rope_original_context=scaling["original_max_position_embeddings"])


def read_hf(folder: Path):
    """ModelArgs' fields and a Meta-named state dict from config.json + pytorch_model*.bin / *.safetensors."""
    cfg = json.loads((folder / "config.json").read_text())
    dim, inter = cfg["hidden_size"], cfg["intermediate_size"]
    # HF states the FFN width outright. multiple_of = width rounds int(8*dim/3) (scaled down by
    # ffn_dim_multiplier if it is bigger) up to exactly that width.
    base = int(2 * 4 * dim / 3)
    n_heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or n_heads
    params = dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=kv_heads,
                  vocab_size=cfg["vocab_size"], multiple_of=inter,
                  ffn_dim_multiplier=None if base <= inter else inter / base,
                  norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=cfg.get("rope_theta", 10000.0))
    params.update(rope_scaling(cfg.get("rope_scaling"), folder))
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise ValueError(f"{folder}/config.json: model_type {cfg['model_type']!r}; this LLaMA reads LLaMA's "
                         f"and Mistral's")
    if cfg.get("tie_word_embeddings"):  # LLaMA-3.2-1B and -3B: no lm_head.weight in the files
        params["tie_word_embeddings"] = True
    if cfg.get("sliding_window") is not None:  # Mistral-7B v0.1: 4096; v0.2 and later: null
        params["sliding_window"] = cfg["sliding_window"]
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
                heads = n_heads if name == "self_attn.q_proj" else kv_heads
                t = Lazy(t.shape, lambda t=t, heads=heads: unpermute(t.make() if isinstance(t, Lazy) else t, heads))
            state[f"layers.{i}.{HF_NAMES[name]}.{suffix}"] = t
        else:
            state[key] = t
    return params, state
