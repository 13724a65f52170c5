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
train, sample, lite (LaVIN-lite at 16/8/4 bits): see bench_train, bench_sample and bench_lite.
e2e: train.py and sample.py --run themselves, as
subprocesses, on random weights written in Meta's and OpenAI's layouts (LaVIN-7B on a GPU).
"""
import argparse
import dataclasses
import itertools
import json
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from PIL import Image

import clip
import data
import generate
from adapter import MMAdapter
from evaluate import evaluate
import quant
from lavin import LLAMA_PRESETS, VIT_L14, LaVIN, LaVINArgs, llama_bytes, load_lavin
from model import KVCache, Llama, ModelArgs, load_llama

BENCH_ARGS = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=16000, multiple_of=256, max_seq_len=1024)


class Report(list):
    """The lines of a benchmark, each printed as it is measured: a run cut short keeps what it had."""

    def append(self, line: str):
        print(line, flush=True)
        super().append(line)

    def __iadd__(self, lines):
        for line in lines:
            self.append(line)
        return self


def timed(fn, device, reps):
    """Seconds per call, after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"


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
    lines.append(f"CLIP ViT-L/14 ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), {device.type}, {dtype}")
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


def shapes_model(bits: int = 16):
    """(folder, LaVIN, tokenizer) of the demo: data/shapes, built on first use, fresh adapters."""
    from data import shapes

    root = shapes.ensure("data/shapes")
    return (root, *load_lavin(root / "llama", root / "clip" / "ViT-tiny.pt", LaVINArgs(), max_seq_len=256, bits=bits))


def random_lavin(device, dtype, args: ModelArgs, vit: dict) -> LaVIN:
    """LaVIN with random frozen backbones of the given sizes in `dtype` and fp32 adapters."""
    torch.manual_seed(0)
    with device:
        llama, visual = Llama(args).to(dtype), clip.VisionTransformer(**vit).to(dtype)
    return LaVIN(LaVINArgs(), llama.eval(), visual.eval(), [1, 2, 3], [1, 2, 3, 4, 5])


def measure_step(model, batches, label, device, dtype, reps, flops_per_step=None) -> tuple[str, float]:
    """(a line, samples/s): samples/s, tokens/s and peak memory of train.py's training step (forward, loss,
    backward into the adapters, AdamW) on these batches in turn; MFU against an H100's 989 TFLOP/s."""
    import train

    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    opt = train.make_optimizer(model, train.TrainConfig(), 1e-4, fused=device.type == "cuda")
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cycle = itertools.cycle(batches)
    step = lambda: train.train_step(model, [next(cycle)], opt, None, autocast, device, 1)  # noqa: E731
    step()  # warm-up (and compilation)
    s = timed(step, device, reps)
    n, T = batches[0]["tokens"].shape
    line = f"  {label}: {n / s:,.1f} samples/s, {n * T / s:,.0f} tokens/s, peak memory {peak_memory(device)}"
    if flops_per_step and device.type == "cuda":
        line += f", MFU {flops_per_step / s / 989e12:.0%}"
    return line, n / s


def shapes_batches(model, tok, root, batch=32):
    """Four training batches of the shapes set, from short to long problems."""
    from data import build_dataset

    ds = build_dataset("shapes", str(root), "train", tok, max_seq_len=256, reserve=model.n_inserted,
                       resolution=model.visual.resolution)
    order = sorted(range(len(ds)), key=lambda i: ds.lengths[i])[::len(ds) // (batch * 4)]
    return [ds.collate([ds[i] for i in order[k::4][:batch]]) for k in range(4)], sum(ds.lengths) / len(ds)


def random_batches(args: ModelArgs, B: int, T: int = 512):
    """A batch of B random samples of T tokens, two thirds of them answer, each with an image."""
    g = torch.Generator().manual_seed(B)
    tokens = torch.randint(3, args.vocab_size, (B, T), generator=g)
    labels = tokens.clone()
    labels[:, : T // 3] = -100  # the prompt; the rest is "The answer is X. BECAUSE: ..."
    return [{"tokens": tokens, "labels": labels, "images": torch.randn(B, 3, 224, 224, generator=g),
             "img_indicator": torch.ones(B, dtype=torch.long)}]


def train_flops(model: LaVIN, B: int, T: int = 512) -> float:
    """4 FLOPs per matmul weight and token: frozen weights, forward and backward into activations."""
    a = model.llama.args  # counted from the config: a quantized LLaMA holds its weights as buffers
    n_llama = a.n_layers * (2 * a.dim * a.dim + 2 * a.dim * a.kv_heads * a.head_dim + 3 * a.dim * a.ffn_hidden)
    n_llama += a.dim * a.vocab_size  # the output head
    visual = model.visual
    n_clip = sum(p.numel() for p in visual.parameters() if p.ndim >= 2)
    return 4 * (n_llama * B * (T + model.n_inserted) + n_clip * B * (visual.grid ** 2 + 1))


def bench_train(device, dtype, quick=False):
    """The whole training step of train.py (LaVIN forward with images, loss on the answer,
    backward into the adapters, AdamW): the shapes model on the CPU, LaVIN-7B with random
    weights on a GPU (4 x 512, then larger batches, with and without --grad_checkpointing and
    --compile). MFU counts 4 FLOPs per matmul parameter and token (frozen weights: forward, and
    backward into activations only) against the GPU's dense bf16 peak (989 TFLOP/s for an H100)."""
    reps = 2 if quick else 5
    lines = Report()
    if device.type == "cpu":
        root, model, tok = shapes_model()
        batches, mean = shapes_batches(model, tok, root)
        lines.append(f"LaVIN on shapes ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), cpu, {dtype}")
        lines.append(measure_step(model, batches, f"training step, batch 32 (mean {mean:.0f} tokens)", device, dtype,
                                  reps)[0])
        return lines
    lines.extend(bench_train_llama(device, dtype, quick, LLAMA_PRESETS["7B"], VIT_L14))  # printed
    return lines


def bench_train_llama(device, dtype, quick, args, vit: dict):
    """LaVIN with random weights of the given sizes: batch 4 x 512 up to what fits."""
    model = random_lavin(device, dtype, args, vit)
    llama, visual = model.llama, model.visual
    lines = Report()
    lines.append(f"LaVIN, LLaMA dim {args.dim} x {args.n_layers} layers, ViT width {vit['width']} x {vit['layers']}, "
                 f"random weights, {device.type} {dtype}: frozen backbones, fp32 adapters")
    for compiled in (False, True):
        if compiled:
            for block in [*llama.layers, *visual.transformer.resblocks]:
                block.compile()
        for ckpt in (False, True):
            llama.grad_checkpointing = visual.grad_checkpointing = ckpt
            tag = f"{'compiled' if compiled else 'eager'}{', grad checkpointing' if ckpt else ''}"
            for B in (4, 8, 16, 32):
                try:
                    lines.append(measure_step(model, random_batches(args, B), f"{tag}, batch {B}x512", device, dtype,
                                              2 if quick else 5, train_flops(model, B))[0])
                except torch.cuda.OutOfMemoryError:
                    lines.append(f"  {tag}, batch {B}x512: out of memory")
                    torch.cuda.empty_cache()
                    break
                if quick:
                    break
    return lines


def padded_tokenizer(n_pieces: int) -> bytes:
    """The shapes sentencepiece model grown to n_pieces (LLaMA's 32000), so that every id a random
    model emits decodes. A model file is a protobuf ModelProto whose field 1 repeats the pieces:
    appended records (piece string, field 1; score float, field 2) extend that list."""
    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])

    def field(number: int, payload: bytes) -> bytes:  # a length-delimited field
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    model = (Path(__file__).parent / "data" / "shapes_backbones" / "tokenizer.model").read_bytes()
    have = sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()
    extra = b"".join(field(1, field(1, f"\u2581pad{i}".encode()) + varint(2 << 3 | 5) + struct.pack("<f", -1e4 - i))
                     for i in range(n_pieces - have))
    assert sentencepiece.SentencePieceProcessor(model_proto=model + extra).get_piece_size() == n_pieces
    return model + extra


def write_random_weights(folder: Path, args: ModelArgs, vit: dict, device, seed: int = 0) -> tuple[Path, Path]:
    """(LLaMA folder, CLIP file) of random weights written as the releases are: Meta's params.json +
    consolidated.00.pth (fp16, Meta's key names) with a tokenizer.model (the shapes one: its ids
    are all the text needs), and a CLIP state dict under OpenAI's "visual." names (fp16). Norm
    weights near 1, the rest N(0, 0.02^2): activations stay finite through every layer."""
    g = torch.Generator(device).manual_seed(seed)

    def fill(key, shape):
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float16) * 0.02
        return (t + 1) if len(shape) == 1 and key.endswith("weight") else t  # RMSNorm / LayerNorm gains

    llama_dir = folder / "llama"
    llama_dir.mkdir(parents=True)
    with torch.device("meta"):  # shapes and names only
        llama, visual = Llama(args), clip.VisionTransformer(**vit)
    torch.save({k: fill(k, v.shape).cpu() for k, v in llama.state_dict().items()}, llama_dir / "consolidated.00.pth")
    params = {"dim": args.dim, "multiple_of": args.multiple_of, "n_heads": args.n_heads, "n_layers": args.n_layers,
              "norm_eps": args.norm_eps, "vocab_size": args.vocab_size}
    (llama_dir / "params.json").write_text(json.dumps(params))
    (llama_dir / "tokenizer.model").write_bytes(padded_tokenizer(args.vocab_size))
    clip_path = folder / "ViT-random.pt"
    torch.save({f"visual.{k}": fill(k, v.shape).cpu() for k, v in visual.state_dict().items()}, clip_path)
    return llama_dir, clip_path


def bench_e2e(device, dtype, quick=False, steps: int = 0):
    """train.py and sample.py themselves, as a user runs them, on random weights written in the
    official layouts (LaVIN-7B on a GPU, a small config on the CPU) and the shapes problems read as
    ScienceQA: load, train `steps` optimizer steps (effective batch 32), write the checkpoint,
    then evaluate the run on the val split with sample.py --run. Times each, from the log."""
    from data import shapes

    if device.type == "cuda":
        args, vit, size, steps = LLAMA_PRESETS["7B"], VIT_L14, "LaVIN-7B", steps or 24
    else:
        args, vit, size, steps = ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=32000, multiple_of=256,
                                           norm_eps=1e-6), dict(resolution=224, patch_size=14, width=128, layers=8,
                                                                output_dim=64), "a small LaVIN", steps or 4
    lines = Report()
    root = shapes.ensure("data/shapes")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        t0 = time.perf_counter()
        llama_dir, clip_path = write_random_weights(Path(d), args, vit, device)
        gb = sum(f.stat().st_size for f in [*llama_dir.iterdir(), clip_path]) / 2**30
        lines.append(f"train.py + sample.py on {size} with random weights in Meta's and OpenAI's layouts "
                     f"({gb:.1f} GiB written in {time.perf_counter() - t0:.0f} s), shapes as ScienceQA, {device.type}")
        out = Path(d) / "run"
        cmd = [sys.executable, "train.py", "--dataset", "scienceqa", "--preset", "lavin-7b", "--data_path", str(root),
               "--llama_path", str(llama_dir), "--clip_path", str(clip_path), "--output_dir", str(out),
               "--max_steps", str(steps), "--skip_eval", "--device", device.type]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        log = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
        rates = sorted(r["samples_per_s"] for r in log[1:]) or [log[0]["samples_per_s"]]
        losses = [r["loss"] for r in log]
        lines.append(f"  train.py, {steps} steps of 32 samples: {wall:.0f} s in all (load, check, train, save); "
                     f"{rates[len(rates) // 2]:,.1f} samples/s (median of steps 2-{steps}); loss {losses[0]:.3f} -> "
                     f"{losses[-1]:.3f}, {sum(x is None for x in losses)} skipped")
        cmd = [sys.executable, "sample.py", "--run", str(out), "--split", "val", "--batch_size", "64",
               "--device", device.type]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        res = json.loads((out / "eval-val" / "results.json").read_text())
        lines.append(f"  sample.py --run, val split ({res['n']} problems, batch 64): {time.perf_counter() - t0:.0f} s "
                     f"in all (load and evaluate); {res['decode_steps_per_problem']} decode steps per problem")
    return lines


class NoEos:
    """A tokenizer whose EOS never comes: decode runs every step it is asked for."""

    eos_id = -1


def decode_rate(model: LaVIN, B: int, ctx: int, new: int, device, dtype, decoder=None):
    """(tokens/s of `new` one-token decode steps after a ctx-token prompt, repeated in B rows;
    row 0's tokens). The routing is computed once; the prefill is not timed: the clock runs from
    the first token sampled to the last, each read back to the host (a sync) as it comes.
    decoder: a generate.StaticDecoder for the steps (--compile); None: the eager forward."""
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, model.llama.args.vocab_size, (ctx - 1,), generator=g).tolist()] * B
    ind = torch.zeros(B, dtype=torch.long, device=device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        x, pad, ind = generate.prefill_embeddings(model, prompts, None, ind)
        routes = model.routes(ind, B, device, x.dtype)

        def run(n):
            cache = KVCache(model.llama.args, B, x.shape[1] + n, pad=pad, device=device, dtype=generate.cache_dtype(x)) \
                if decoder is None else decoder.cache(B, pad, generate.cache_dtype(x))
            times = []
            out, _, _ = generate.decode(model, NoEos(), cache, routes, x, n + 1, decoder=decoder,
                                      on_token=lambda b, ids: b == 0 and times.append(time.perf_counter()))
            return B * n / (times[-1] - times[0]), out[0]

        run(4)  # warm-up (and compilation, and capture of the CUDA graph)
        return run(new)


def same_tokens(got: list, want: list) -> str:
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    return f"the same {len(want)} tokens as eager" if k is None and len(got) == len(want) else \
        f"NOT the eager tokens (first difference at token {k} of {len(want)})"


def bench_sample(device, dtype, quick=False, big=None):
    """sample.py: decode tokens/s at batch 1 and 16 (prefill excluded: one prefill, then timed
    one-token steps with the KV cache, the routing computed once), eager and --compile, and, on
    the CPU, evaluation problems/s on the shapes test split (early stop, as `python sample.py
    --dataset shapes`)."""
    if (device.type != "cpu") if big is None else big:  # LaVIN-7B on a GPU
        # The static step attends to all max_seq_len slots: 640 hold the prompt's 517 and 65 new tokens.
        args = dataclasses.replace(LLAMA_PRESETS["7B"], max_seq_len=640)
        return bench_sample_llama(device, dtype, args, VIT_L14, quick)
    root, model, tok = shapes_model()
    model.eval()
    lines = Report()
    lines.append(f"sample.py on the shapes model ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), cpu")
    for B in (1, 16):
        rate, want = decode_rate(model, B, 100, 64, device, dtype)
        lines.append(f"  decode, batch {B}, 100-token context: {rate:,.0f} tokens/s")
        if B == 1:
            t0 = time.perf_counter()
            compiled, got = decode_rate(model, B, 100, 64, device, dtype, generate.StaticDecoder(model.llama))
            lines.append(f"  decode, batch 1, 100-token context, --compile: {compiled:,.0f} tokens/s ({compiled / rate:.1f}x "
                         f"eager; {time.perf_counter() - t0:.0f} s to compile and run), {same_tokens(got, want)}")
    task = data.evaluation("shapes", str(root), "test", tok, prompt_format="QCM-A", resolution=model.visual.resolution)
    ds = task.dataset
    stats = {}
    t0 = time.perf_counter()
    evaluate(model, tok, task, batch_size=64, progress=False, stats=stats)
    s = time.perf_counter() - t0
    lines.append(f"  evaluation of the {len(ds)} test problems, batch 64, early stop: {len(ds) / s:,.1f} problems/s "
                 f"({stats['row_steps'] / len(ds):.1f} decode steps per problem; the reference decodes 64)")
    return lines


def bench_sample_llama(device, dtype, args: ModelArgs, vit: dict, quick=False):
    """LaVIN with random weights of the given sizes: decode at a 512-token context, eager at batch
    1 and 16, then the compiled static step (a CUDA graph on a GPU), which must give the eager tokens."""
    model = random_lavin(device, dtype, args, vit).eval()
    title = f"sample.py, LaVIN with random weights (LLaMA dim {args.dim} x {args.n_layers} layers), {device.type} {dtype}"
    lines, eager = Report(), {}
    lines.append(title)
    for B in (1,) if quick else (1, 16):
        eager[B] = decode_rate(model, B, 512, 64, device, dtype)  # (tokens/s, tokens)
        lines.append(f"  decode, batch {B}, 512-token context, eager: {eager[B][0]:,.1f} tokens/s")
    decoder = generate.StaticDecoder(model.llama)  # one for both batch sizes, as in an evaluation
    for B, (eager_rate, want) in eager.items():
        t0 = time.perf_counter()
        rate, got = decode_rate(model, B, 512, 64, device, dtype, decoder)
        lines.append(f"  decode, batch {B}, 512-token context, --compile: {rate:,.1f} tokens/s ({rate / eager_rate:.1f}x "
                     f"eager; {time.perf_counter() - t0:.0f} s to compile and run), {same_tokens(got, want)}")
    return lines


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
        out = subprocess.run([sys.executable, "-c", "import sys, bench; bench.load_peak(sys.argv[1])", str(llama_dir)],
                             check=True, capture_output=True, text=True, cwd=Path(__file__).parent).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return (f"  load_llama(bits=4) of a {size / 1e9:.2f} GB fp16 checkpoint (dim {args.dim} x {args.n_layers} layers), "
            f"a fresh process: {r['seconds']:.1f} s; the model holds {r['held'] / 1e9:.2f} GB, the process's own memory "
            f"rose by {r['rise'] / 1e9:.2f} GB at its peak")


def bench_lite(device, dtype, quick=False):
    """LaVIN-lite: the frozen LLaMA's bytes at 16, 8 and 4 bits (exact, from the configs); on the CPU
    the host memory of a streamed 4-bit load, and the shapes model's training step and decode at each bits; on a GPU LaVIN-7B-lite with random
    weights: the training step with gradient checkpointing at 1 x 512 and 4 x 512, eager and
    compiled, and decode at batch 1, eager and --compile."""
    lines = Report()
    lines.append("LaVIN-lite: the frozen LLaMA (embeddings, norms and output head in bf16, the blocks' linears at "
                 "16/8/4 bits), exact from the config")
    for size in ("7B", "13B"):
        n = {bits: llama_bytes(LLAMA_PRESETS[size], bits) for bits in (16, 8, 4)}
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
    args = LLAMA_PRESETS["7B"]
    model = random_lavin(device, dtype, args, VIT_L14)
    quant.quantize_(model.llama.layers, 4)  # the random bf16 weights become NF4; the 16-bit copies are freed
    torch.cuda.empty_cache()
    lines.append(f"LaVIN-7B-lite, random weights, {device.type} {dtype}: LLaMA blocks in NF4 "
                 f"({quant.held_bytes(model.llama) / 2**30:.2f} GiB), CLIP in bf16, fp32 adapters")
    model.llama.grad_checkpointing = model.visual.grad_checkpointing = True
    for compiled in (False, True):
        if compiled:
            for block in [*model.llama.layers, *model.visual.transformer.resblocks]:
                block.compile()
        for B in (1, 4):
            tag = f"{'compiled' if compiled else 'eager'}, grad checkpointing, batch {B}x512"
            try:
                lines.append(measure_step(model, random_batches(args, B), tag, device, dtype, reps, train_flops(model, B))[0])
            except torch.cuda.OutOfMemoryError:
                lines.append(f"  {tag}: out of memory")
                torch.cuda.empty_cache()
    del model  # its blocks are compiled: decode gets a fresh one, after this one is freed
    torch.cuda.empty_cache()
    model = random_lavin(device, dtype, dataclasses.replace(args, max_seq_len=640), VIT_L14).eval()
    quant.quantize_(model.llama.layers, 4)
    torch.cuda.empty_cache()
    eager, want = decode_rate(model, 1, 512, 64, device, dtype)
    lines.append(f"  decode, batch 1, 512-token context, eager: {eager:,.1f} tokens/s")
    t0 = time.perf_counter()
    rate, got = decode_rate(model, 1, 512, 64, device, dtype, generate.StaticDecoder(model.llama))
    lines.append(f"  decode, batch 1, 512-token context, --compile: {rate:,.1f} tokens/s ({rate / eager:.1f}x eager; "
                 f"{time.perf_counter() - t0:.0f} s to compile and run), {same_tokens(got, want)}")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["llama", "clip", "train", "sample", "e2e", "lite"])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--compare-hf", action="store_true")
    a = p.parse_args()
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
