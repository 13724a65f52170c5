"""The official file formats, written as their makers write them, for tiny models made in the tests:
the loaders under test then read the same bytes a real download holds.

  LLaMA    Meta's params.json + consolidated.NN.pth shards; Hugging Face's config.json + shards + index
           (q/k rows permuted as transformers' converter does)
  CLIP     Hugging Face's CLIPModel folder (OpenAI's archive is torch.save of the state dict)
  LLaMA-3  a BPE vocabulary trained here, as Meta's ranks file or Hugging Face's tokenizer.json
  PNG      a header alone, of any size (a decompression bomb without its pixels)
"""
import json
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import torch

import clip

# The pattern of Meta's llama3 tokenizer, typed here from its definition.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def write_meta(folder: Path, params: dict, state: dict, n_shards: int = 1, extra: dict | None = None):
    """params.json + consolidated.NN.pth, split as Meta's model-parallel shards are."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    shards = [{} for _ in range(n_shards)]
    for key, t in state.items():
        dim = SPLIT.get(key.rsplit(".", 2)[-2])
        parts = [t] * n_shards if dim is None else list(t.chunk(n_shards, dim=dim))
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    for i, shard in enumerate(shards):
        shard.update(extra or {})
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return folder


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What transformers' convert_llama_weights_to_hf.py does to wq and wk."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def write_hf(folder: Path, args, state: dict, n_files: int = 2, fmt: str = "bin"):
    """config.json + pytorch_model-0000N-of-0000M.bin (or model-*.safetensors) and their index, HF names."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
           "intermediate_size": args.ffn_hidden, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
           "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
           "max_position_embeddings": 2048, "hidden_act": "silu", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(cfg))
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    hf = {}
    for key, t in state.items():
        if key == "tok_embeddings.weight":
            hf["model.embed_tokens.weight"] = t
        elif key == "norm.weight":
            hf["model.norm.weight"] = t
        elif key == "output.weight":
            hf["lm_head.weight"] = t
        else:
            _, i, rest = key.split(".", 2)
            name, suffix = rest.rsplit(".", 1)
            if name == "attention.wq":
                t = hf_permute(t, args.n_heads)
            elif name == "attention.wk":
                t = hf_permute(t, args.kv_heads)
            hf[f"model.layers.{i}.{names[name]}.{suffix}"] = t
            if name == "attention.wq":  # old exports carry the rotary table
                hf[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(args.head_dim // 2)
    keys = sorted(hf)
    chunks = [keys[i::n_files] for i in range(n_files)]
    weight_map = {}
    for j, chunk in enumerate(chunks):
        part = {k: hf[k].contiguous().clone() for k in chunk}
        name = f"pytorch_model-{j + 1:05d}-of-{n_files:05d}.bin" if fmt == "bin" else \
            f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"
        weight_map.update({k: name for k in chunk})
        if fmt == "bin":
            torch.save(part, folder / name)
        else:
            from safetensors.torch import save_file

            save_file(part, str(folder / name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf.values())}, "weight_map": weight_map}
    (folder / ("pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json")).write_text(
        json.dumps(index))  # the shards' index, as save_pretrained writes it
    return folder


def write_hf_clip(folder: Path, vit: clip.VisionTransformer, fmt: str = "safetensors", act: str = "quick_gelu"):
    """vit's weights as transformers' CLIPModel saves openai/clip-vit-large-patch14: config.json and
    model.safetensors (or pytorch_model.bin), separate q/k/v, the (sic) pre_layrnorm, a text tower."""
    folder.mkdir(parents=True)
    sd, hf = vit.state_dict(), {}
    e, w = "vision_model.embeddings.", vit.width
    hf[e + "patch_embedding.weight"] = sd["conv1.weight"]
    hf[e + "class_embedding"] = sd["class_embedding"]
    hf[e + "position_embedding.weight"] = sd["positional_embedding"]
    hf[e + "position_ids"] = torch.arange(vit.grid ** 2 + 1)[None]
    for part in ("weight", "bias"):
        hf[f"vision_model.pre_layrnorm.{part}"] = sd[f"ln_pre.{part}"]
        hf[f"vision_model.post_layernorm.{part}"] = sd[f"ln_post.{part}"]
        for i in range(vit.layers):
            b, o = f"vision_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
            q, k, v = sd[f"{o}attn.in_proj_{part}"].split(w)
            hf[b + f"self_attn.q_proj.{part}"], hf[b + f"self_attn.k_proj.{part}"] = q.clone(), k.clone()
            hf[b + f"self_attn.v_proj.{part}"] = v.clone()
            hf[b + f"self_attn.out_proj.{part}"] = sd[f"{o}attn.out_proj.{part}"]
            hf[b + f"layer_norm1.{part}"], hf[b + f"layer_norm2.{part}"] = sd[f"{o}ln_1.{part}"], sd[f"{o}ln_2.{part}"]
            hf[b + f"mlp.fc1.{part}"], hf[b + f"mlp.fc2.{part}"] = sd[f"{o}mlp.c_fc.{part}"], sd[f"{o}mlp.c_proj.{part}"]
    hf["visual_projection.weight"] = sd["proj"].t().contiguous()
    hf["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 8)  # a full CLIPModel's
    hf["logit_scale"] = torch.tensor(4.6052)
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": vit.output_dim,
              "vision_config": {"hidden_size": w, "num_hidden_layers": vit.layers, "num_attention_heads": vit.heads,
                                "patch_size": vit.patch_size, "image_size": vit.resolution,
                                "intermediate_size": 4 * w, "hidden_act": act, "layer_norm_eps": 1e-5,
                                "projection_dim": vit.output_dim}}
    (folder / "config.json").write_text(json.dumps(config))
    hf = {k: t.contiguous() for k, t in hf.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(hf, folder / "model.safetensors")
    else:
        torch.save(hf, folder / "pytorch_model.bin")


def train_ranks(text: str, n_merges=300, seed=0) -> dict[bytes, int]:
    """A byte-level BPE vocabulary: the 256 bytes in a shuffled order (ranks need not follow byte
    values), then the most frequent adjacent pair of text's pieces, merged, n_merges times."""
    import regex  # optional: the tests that read LLaMA-3's tokenizer skip without it
    order = list(range(256))
    random.Random(seed).shuffle(order)
    ranks = {bytes([b]): r for r, b in enumerate(order)}
    words = Counter(tuple(bytes([c]) for c in p.encode()) for p in regex.findall(LLAMA3_PATTERN, text))
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table, in its own form: printable bytes map to themselves, the rest to 256 + n."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer_json(path, ranks: dict, special: dict[int, str]):
    """tokenizer.json as Hugging Face ships LLaMA-3's: a byte-level BPE over the ranks, its merges
    (each token's splits into two tokens, in the merged token's rank order), the special tokens as
    added_tokens, the split pattern then ByteLevel without its own regex."""
    table = gpt2_bytes_to_unicode()
    spell = lambda b: "".join(table[c] for c in b)  # noqa: E731
    merges = [f"{spell(t[:i])} {spell(t[i:])}" for t, _ in sorted(ranks.items(), key=lambda x: x[1])
              for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, name in sorted(special.items())],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {spell(t): r for t, r in ranks.items()}, "merges": merges}}
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return path


def png_header(width, height) -> bytes:
    """A PNG of the given size without pixel data: Pillow reads the size before anything else."""
    def chunk(kind, data=b""):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND")
