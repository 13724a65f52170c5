"""Writers for tiny checkpoints in the official layouts, shared by the tests.

Each writer produces exactly what the real release holds (file names, key names, shard splits,
Hugging Face's permuted q/k rows), so the loaders under test are the ones that read real files.
"""
import io
import json
from pathlib import Path

import sentencepiece as spm
import torch

TEXT = """The quick brown fox jumps over the lazy dog.
Question: Which animal is faster? Context: N/A Options: (A) fox (B) dog Response:
The answer is A. BECAUSE: foxes run faster than lazy dogs.
Image: N/A Instruction: describe the picture. Response: a cat sits on a mat.
LLaMA reads text; LaVIN teaches it to see through CLIP with tiny adapters.
""" * 20

SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def train_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A real sentencepiece model with LLaMA's ids: unk 0, BOS 1, EOS 2, no pad."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def random_state(args, seed: int = 0) -> dict:
    """Meta-named weights of a LLaMA with the given ModelArgs, at a scale that keeps logits lively."""
    from model import Llama

    torch.manual_seed(seed)
    model = Llama(args)
    state = {}
    for k, v in model.state_dict().items():
        state[k] = (1 + 0.1 * torch.randn_like(v)) if k.endswith("norm.weight") else torch.randn_like(v) * 0.1
    return state


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
    """config.json + pytorch_model-0000N-of-0000M.bin (or model-*.safetensors), HF names."""
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
    for j, chunk in enumerate(chunks):
        part = {k: hf[k].contiguous().clone() for k in chunk}
        if fmt == "bin":
            torch.save(part, folder / f"pytorch_model-{j + 1:05d}-of-{n_files:05d}.bin")
        else:
            from safetensors.torch import save_file

            save_file(part, str(folder / f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"))
    return folder


def write_chat_run(folder: Path, chat_set: Path, seed: int = 0, std: float = 0.05) -> Path:
    """A train.py output folder of the shapes-chat preset over the shipped tiny Vicuna and CLIP
    (adapters.pth with the run's config). The adapters are random where training would have moved
    them (up-projections, routers, modality tokens): they change the answers and the routing
    differs between layers, tokens and modalities."""
    from data import shapes
    from lavin import LaVINArgs, load_lavin, save_adapters

    llama, clip_path = shapes.BACKBONES / "vicuna", shapes.BACKBONES / "clip" / "ViT-tiny.pt"
    model, _ = load_lavin(llama, clip_path, LaVINArgs(), max_seq_len=256)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in (".conv_B.", ".conv_D.", ".expert_weights.", "modality_embedding")):
                p.normal_(0, std if ".conv_" in name else 1.0, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(dataset="shapes-chat", llama_path=str(llama), clip_path=str(clip_path), data_path=str(chat_set),
                  max_seq_len=256, image_mode="lavin", threads=1, bits=16)
    save_adapters(folder / "adapters.pth", model, config=config, step=1)
    return folder
