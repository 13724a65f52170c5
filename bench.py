"""Benchmarks (not tests): how fast the parts run on this machine. Figures go in the README.

    python bench.py                 # everything, on the GPU if there is one, else the CPU
    python bench.py --only llama    # llama | clip | train | sample | e2e | lite
    python bench.py --quick         # fewer repetitions
    python bench.py --compare-hf    # also time transformers' LlamaForCausalLM on the same config

LLaMA: a ~110M-parameter config (dim 768, 12 layers, vocab 16k). Forward+backward with frozen
weights, gradients flowing to the input embeddings only (as in LaVIN, where only adapters train),
and greedy decoding at a 512-token context with and without the KV cache.
CLIP: ViT-L/14 with random weights, frozen: forward without grad, and forward+backward into
LaVIN's mixture-of-modality adapters only; preprocessing of a 640x480 JPEG in both modes.
train, e2e: benchmarks/training.py; sample: benchmarks/decoding.py; lite: benchmarks/lite.py
(benchmarks/__init__.py holds what they share).
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import clip
from adapter import MMAdapter
from benchmarks import Report, peak_memory, timed
from benchmarks.decoding import bench_sample
from benchmarks.lite import bench_lite
from benchmarks.training import bench_e2e, bench_train
from model import KVCache, Llama, ModelArgs

BENCH_ARGS = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=16000, multiple_of=256, max_seq_len=1024)


def llama_step(model, batch, seq, device, dtype):
    """Forward+backward of a frozen LLaMA with gradients to the input embeddings only."""
    tokens = torch.randint(0, model.args.vocab_size, (batch, seq), device=device)

    def step():
        embeds = model.tok_embeddings(tokens).detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(embeds=embeds)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
        loss.backward()

    return step


def bench_llama(device, dtype, quick=False, compare_hf=False):
    args = BENCH_ARGS
    torch.manual_seed(0)
    model = Llama(args).to(device).eval().requires_grad_(False)
    if dtype != torch.float32:
        model.to(dtype)  # frozen weights in half precision, as train.py keeps them on the GPU
    n_params = sum(p.numel() for p in model.parameters())
    lines = Report()
    lines.append(f"LLaMA {n_params / 1e6:.0f}M params (dim {args.dim}, {args.n_layers} layers), {device.type}, {dtype}")
    batch, seq = (4, 256) if device.type == "cpu" else (16, 512)
    reps = 1 if quick else 3
    s = timed(llama_step(model, batch, seq, device, dtype), device, reps)
    lines.append(f"  forward+backward (grads to inputs only), batch {batch}x{seq}: {batch * seq / s:,.0f} tokens/s")

    ctx, new = 512, 16 if device.type == "cpu" else 64
    prompt = torch.randint(0, args.vocab_size, (1, ctx), device=device)
    nxt = torch.randint(0, args.vocab_size, (1, 1), device=device)

    def decode_cached():
        cache = KVCache(args, batch=1, max_len=ctx + new, device=device, dtype=next(model.parameters()).dtype)
        model(prompt, cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new):
            model(nxt, cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return new / (time.perf_counter() - t0)

    def decode_uncached(steps=4):
        seqs = [torch.cat([prompt, nxt.expand(1, i)], 1) for i in range(1, steps + 1)]
        t0 = time.perf_counter()
        for s_ in seqs:
            model(s_)[:, -1].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t0)

    with torch.no_grad():
        decode_cached()  # warm-up
        cached, uncached = decode_cached(), decode_uncached()
    lines.append(f"  decode at {ctx}-token context: {cached:,.1f} tokens/s with KV cache, "
                 f"{uncached:,.1f} without ({cached / uncached:.0f}x)")
    lines.append(f"  peak memory: {peak_memory(device)}")
    if compare_hf:
        lines += bench_hf(device, dtype, batch, seq, reps)
    return lines


def bench_hf(device, dtype, batch, seq, reps):
    """The same step on transformers' LLaMA (pip install transformers; not a project dependency)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = BENCH_ARGS
    cfg = LlamaConfig(hidden_size=a.dim, intermediate_size=a.ffn_hidden, num_hidden_layers=a.n_layers,
                      num_attention_heads=a.n_heads, vocab_size=a.vocab_size, attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg).to(device).eval().requires_grad_(False)
    if dtype != torch.float32:
        hf.to(dtype)
    tokens = torch.randint(0, a.vocab_size, (batch, seq), device=device)

    def step():
        embeds = hf.model.embed_tokens(tokens).detach().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = hf(inputs_embeds=embeds).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()

    s = timed(step, device, reps)
    return [f"  transformers LlamaForCausalLM, same config and step: {batch * seq / s:,.0f} tokens/s"]


def bench_clip(device, dtype, quick=False):
    batch, reps = (2, 1) if device.type == "cpu" else (32, 3 if quick else 10)
    torch.manual_seed(0)
    with device:  # ViT-L/14's shapes
        model = clip.VisionTransformer(resolution=224, patch_size=14, width=1024, layers=24, output_dim=768)
    model = model.to(dtype).eval().requires_grad_(False)
    images = torch.randn(batch, 3, 224, 224, device=device)
    lines = Report()
    n_params = sum(p.numel() for p in model.parameters())
    lines.append(f"CLIP ViT-L/14 ({n_params / 1e6:.0f}M params), {device.type}, {dtype}")
    amp = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731

    def forward():
        with torch.no_grad(), amp():
            model(images)

    s = timed(forward, device, reps)
    lines.append(f"  forward, no grad, batch {batch}: {batch / s:,.2f} images/s")
    for block in model.transformer.resblocks:  # LaVIN's adapters, in fp32, the only trainable part
        block.adapter_attn = MMAdapter(1024).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def train_step():
        with amp():
            out = model(images)  # (B, 6, 1024)
        out.float().pow(2).mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = timed(train_step, device, reps)
    lines.append(f"  forward+backward into {sum(p.numel() for p in trainable):,} adapter parameters, "
                 f"batch {batch}: {batch / s:,.2f} images/s; peak memory {peak_memory(device)}")
    rng = np.random.default_rng(0)  # a smooth picture with noise: a JPEG of realistic entropy
    yy, xx = np.mgrid[0:480, 0:640]
    pixels = np.stack([xx * 255 // 640, yy * 255 // 480, (xx + yy) % 256], -1) + rng.integers(-16, 17, (480, 640, 3))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "photo.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        for mode in ("clip", "lavin"):
            s = timed(lambda: clip.preprocess(path, mode), torch.device("cpu"), 5 if quick else 30)
            lines.append(f"  preprocess a 640x480 JPEG, mode {mode} (decode, resize, normalise; one process): "
                         f"{1 / s:,.0f} images/s")
    return lines


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["llama", "clip", "train", "sample", "e2e", "lite"])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--compare-hf", action="store_true")
    return p


def main():
    a = parser().parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    if a.only in (None, "llama"):
        bench_llama(device, dtype, a.quick, a.compare_hf)
    if a.only in (None, "clip"):
        bench_clip(device, dtype, a.quick)
    if a.only in (None, "train"):
        bench_train(device, dtype, a.quick)
    if a.only in (None, "sample"):
        bench_sample(device, dtype, a.quick)
    if a.only in (None, "e2e"):
        bench_e2e(device, dtype, a.quick)
    if a.only in (None, "lite"):
        bench_lite(device, dtype, a.quick)


if __name__ == "__main__":
    main()
