"""bench.py --only lite: LaVIN-lite, the frozen LLaMA's blocks at 16, 8 and 4 bits: its bytes, the
host memory of a streamed 4-bit load, and the training step and decoding at each bits."""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import clip
import generate
import quant
from benchmarks import Report, decode_rate, measure_step, random_batches, random_lavin, same_tokens, shapes_batches, \
    shapes_model, train_flops
from benchmarks.training import write_random_weights
from lavin import LLAMA_SIZES, VIT_L14, compile_blocks, llama_bytes
from model import ModelArgs, load_llama


def anon_bytes() -> int:
    """The process's anonymous resident memory (Linux): what it owns, without the pages of files it
    maps, which belong to the page cache and go under memory pressure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def load_peak(folder: str):
    """Print, as JSON, the seconds load_llama(bits=4) takes on folder and how far the process's own
    memory rose above where it stood before it (sampled every 5 ms), and the model's bytes."""
    import threading

    before, peak, done = anon_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak.append(anon_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=watch)
    thread.start()
    t0 = time.perf_counter()
    model, _ = load_llama(folder, dtype=torch.bfloat16, bits=4)
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    print(json.dumps({"seconds": seconds, "rise": max(peak) - before, "held": quant.held_bytes(model)}))


def lite_load_memory(args: ModelArgs) -> str:
    """Host memory while load_llama(bits=4) streams a random checkpoint in Meta's layout, in a
    fresh process (no memory freed before to reuse): the peak rise of the process's own memory
    against the file and the quantized model."""
    vit = dict(resolution=224, patch_size=14, width=64, layers=4, output_dim=32)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        llama_dir, _ = write_random_weights(Path(d), args, vit, torch.device("cpu"))
        size = sum(f.stat().st_size for f in llama_dir.glob("consolidated.*.pth"))
        code = "import sys, benchmarks.lite as b; b.load_peak(sys.argv[1])"
        out = subprocess.run([sys.executable, "-c", code, str(llama_dir)], check=True, capture_output=True, text=True,
                             cwd=Path(__file__).parents[1]).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return (f"  load_llama(bits=4) of a {size / 1e9:.2f} GB fp16 checkpoint (dim {args.dim} x {args.n_layers} layers), "
            f"a fresh process: {r['seconds']:.1f} s; the model holds {r['held'] / 1e9:.2f} GB, the process's own memory "
            f"rose by {r['rise'] / 1e9:.2f} GB at its peak")


def bench_lite(device, dtype, quick=False):
    """LaVIN-lite: the frozen LLaMA's bytes at 16, 8 and 4 bits (exact, from the configs); on the CPU
    the host memory of a streamed 4-bit load, and the shapes model's training step and decode at
    each bits; on a GPU LaVIN-7B-lite and 13B-lite with random weights: the training step with
    gradient checkpointing at 1 x 512 and 4 x 512 (7B eager and compiled, 13B compiled), and decode
    at batch 1, eager and --compile, at 4 bits (7B, 13B) and 8 bits (7B)."""
    lines = Report()
    lines.append("LaVIN-lite: the frozen LLaMA (embeddings, norms and output head in bf16, the blocks' linears at "
                 "16/8/4 bits), exact from the config")
    for size in ("7B", "13B"):
        n = {bits: llama_bytes(LLAMA_SIZES[size], bits) for bits in (16, 8, 4)}
        lines.append(f"  LLaMA-{size}: 16 bits {n[16] / 1e9:.2f} GB, 8 bits {n[8] / 1e9:.2f} GB ({n[8] / n[16]:.0%}), "
                     f"4 bits (NF4) {n[4] / 1e9:.2f} GB ({n[4] / n[16]:.0%})")
    with torch.device("meta"):  # what quantizing CLIP too would save: it stays 16-bit (the official lite's choice)
        vit = clip.VisionTransformer(**VIT_L14)
    linears = sum(p.numel() for p in vit.transformer.parameters() if p.ndim == 2)
    lines.append(f"  ViT-L/14's block linears: {2 * linears / 1e9:.2f} GB at 16 bits, {linears * (4 + 8 / 64) / 8 / 1e9:.2f} "
                 f"GB at 4 bits (not quantized)")
    reps = 2 if quick else 5
    if device.type == "cpu":
        base, batches = {}, None
        for bits in (16, 8, 4):
            root, model, tok = shapes_model(bits)
            batches = batches or shapes_batches(model, tok, root)[0]  # the same samples at every bits
            line, rate = measure_step(model, batches, f"shapes model at {bits} bits, training step, batch 32", device,
                                      dtype, reps)
            model.eval()
            tokens, _ = decode_rate(model, 1, 100, 64, device, dtype)
            base.setdefault("train", rate)
            base.setdefault("decode", tokens)
            lines.append(f"{line}; decode, batch 1: {tokens:,.0f} tokens/s "
                         f"({rate / base['train']:.2f}x and {tokens / base['decode']:.2f}x 16 bits)")
        if Path("/proc/self/status").is_file():
            lines.append(lite_load_memory(ModelArgs(dim=2048, n_layers=8, n_heads=16, vocab_size=32000, multiple_of=256,
                                                    norm_eps=1e-6)))
        return lines
    for size in ("7B", "13B"):
        lite_training(lines, size, device, dtype, reps, eager=size == "7B")
    for size, bits in (("7B", 4), ("7B", 8), ("13B", 4)):
        lite_decode(lines, size, bits, device, dtype)
    return lines


def lite_training(lines: Report, size: str, device, dtype, reps: int, eager: bool):
    """LaVIN-{size}-lite with random weights: the training step with gradient checkpointing, at
    1 x 512 and 4 x 512, eager (7B) and compiled, samples/s and peak memory."""
    args = LLAMA_SIZES[size]
    model = random_lavin(device, dtype, args, VIT_L14)
    quant.quantize_(model.llama.layers, 4)  # the random bf16 weights become NF4; the 16-bit copies are freed
    torch.cuda.empty_cache()
    lines.append(f"LaVIN-{size}-lite, random weights, {device.type} {dtype}: LLaMA blocks in NF4 "
                 f"({quant.held_bytes(model.llama) / 2**30:.2f} GiB), CLIP in bf16, fp32 adapters")
    model.llama.grad_checkpointing = model.visual.grad_checkpointing = True
    for compiled in (False, True) if eager else (True,):
        if compiled:
            compile_blocks(model)
        for B in (1, 4):
            tag = f"{'compiled' if compiled else 'eager'}, grad checkpointing, batch {B}x512"
            try:
                lines.append(measure_step(model, random_batches(args, B), tag, device, dtype, reps,
                                          train_flops(model, B))[0])
            except torch.cuda.OutOfMemoryError:
                lines.append(f"  {tag}: out of memory")
                torch.cuda.empty_cache()
    del model  # its blocks are compiled: decoding gets a fresh model, after this one is freed
    torch.cuda.empty_cache()


def lite_decode(lines: Report, size: str, bits: int, device, dtype):
    """Decoding at batch 1 from a 512-token context over LLaMA-{size} blocks at `bits`: eager, and
    compiled (the one-token step reads the codes: quant.fused_matvec)."""
    model = random_lavin(device, dtype, dataclasses.replace(LLAMA_SIZES[size], max_seq_len=640), VIT_L14).eval()
    quant.quantize_(model.llama.layers, bits)
    torch.cuda.empty_cache()
    tag = f"  LLaMA-{size} at {bits} bits, decode, batch 1, 512-token context"
    eager, want = decode_rate(model, 1, 512, 64, device, dtype)
    lines.append(f"{tag}, eager: {eager:,.1f} tokens/s")
    t0 = time.perf_counter()
    rate, got = decode_rate(model, 1, 512, 64, device, dtype, generate.StaticDecoder(model.llama))
    lines.append(f"{tag}, --compile: {rate:,.1f} tokens/s ({rate / eager:.1f}x eager; "
                 f"{time.perf_counter() - t0:.0f} s to compile and run), {same_tokens(got, want)}")
    del model
    torch.cuda.empty_cache()
