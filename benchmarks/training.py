"""bench.py --only train and --only e2e: train.py's training step (the shapes model on the CPU,
LaVIN-7B with random weights on a GPU, eager and compiled, with and without gradient
checkpointing, with and without the adapters), and train.py + sample.py --run as a user runs
them, on random weights written in Meta's and OpenAI's layouts."""
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece
import torch

import clip
from benchmarks import Report, measure_step, random_batches, random_lavin, shapes_batches, shapes_model, train_flops
from lavin import LLAMA_SIZES, VIT_L14, compile_blocks
from model import Llama, ModelArgs


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
    lines.extend(bench_train_llama(device, dtype, quick, LLAMA_SIZES["7B"], VIT_L14))  # printed
    return lines


def bench_train_llama(device, dtype, quick, args, vit: dict):
    """LaVIN with random weights of the given sizes, batch 4 x 512 up to what fits: eager (with
    and without the adapters: what they cost), then compiled (train.py's default on a GPU), each
    with and without gradient checkpointing."""
    model = random_lavin(device, dtype, args, vit)
    llama, visual = model.llama, model.visual
    lines = Report()
    lines.append(f"LaVIN, LLaMA dim {args.dim} x {args.n_layers} layers, ViT width {vit['width']} x {vit['layers']}, "
                 f"random weights, {device.type} {dtype}: frozen backbones, fp32 adapters")

    def row(tag, B, ckpt) -> float | None:
        llama.grad_checkpointing = visual.grad_checkpointing = ckpt
        try:
            line, rate = measure_step(model, random_batches(args, B), f"{tag}, batch {B}x512", device, dtype,
                                      2 if quick else 5, train_flops(model, B))
        except torch.cuda.OutOfMemoryError:
            lines.append(f"  {tag}, batch {B}x512: out of memory")
            torch.cuda.empty_cache()
            return None
        lines.append(line)
        return rate

    with_adapters = row("eager", 4, False)
    # Without CLIP's adapters nothing runs backward through CLIP: its backward pass counts as theirs.
    for who, blocks in (("the adapters", [*llama.layers, *visual.transformer.resblocks]),
                        ("LLaMA's adapters", llama.layers)):
        removed = set_adapters(blocks, [None] * len(blocks))
        rate = row(f"eager, without {who}", 4, False)
        set_adapters(blocks, removed)
        if with_adapters and rate:
            lines.append(f"  {who} add {rate / with_adapters - 1:.0%} to the eager step at 4x512")
    for compiled in (False, True):
        if compiled:
            compile_blocks(model)  # as train.py does
        for ckpt in (False, True):
            tag = f"{'compiled' if compiled else 'eager'}{', grad checkpointing' if ckpt else ''}"
            for B in (4,) if quick else (4, 8, 16, 32):
                if (compiled, ckpt, B) == (False, False, 4):
                    continue  # measured above
                if row(tag, B, ckpt) is None:
                    break  # out of memory: a larger batch will not fit either
    return lines


def set_adapters(blocks, adapters: list) -> list:
    """Put `adapters` (one per block, None for none) in the blocks' adapter_attn slots; returns what
    the slots held."""
    held = [b.adapter_attn for b in blocks]
    for block, adapter in zip(blocks, adapters):
        block.adapter_attn = adapter
    return held


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

    model = (Path(__file__).parents[1] / "data" / "shapes_backbones" / "tokenizer.model").read_bytes()
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
    ScienceQA (1,500 of them, ~300 in the val split): load, train `steps` optimizer steps
    (effective batch 32), write the checkpoint, then evaluate the run on the val split with
    sample.py --run. Each with its defaults: compiled on a GPU. Times each, from the log."""
    from data import shapes

    if device.type == "cuda":
        args, vit, size, steps = LLAMA_SIZES["7B"], VIT_L14, "LaVIN-7B", steps or 24
    else:
        args, vit, size, steps = ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=32000, multiple_of=256,
                                           norm_eps=1e-6), dict(resolution=224, patch_size=14, width=128, layers=8,
                                                                output_dim=64), "a small LaVIN", steps or 4
    lines = Report()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        root = shapes.ensure(Path(d) / "shapes", n_problems=1500, quiet=True)
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
        said = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        print(said, end="")
        res = json.loads((out / "eval-val" / "results.json").read_text())
        rate = re.search(r"\(([\d,.]+) problems/s", said).group(1)  # evaluate_split's line
        lines.append(f"  sample.py --run, val split ({res['n']} problems, batch 64): {time.perf_counter() - t0:.0f} s "
                     f"in all (load and evaluate); {rate} problems/s in the evaluation, "
                     f"{res['decode_steps_per_problem']} decode steps per problem")
    return lines
