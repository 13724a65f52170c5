"""bench.py --only sample: sample.py's decoding, eager and --compile (the shapes model on the CPU,
with its evaluation; LaVIN-7B with random weights on a GPU)."""
import dataclasses
import time

import data
import generate
from benchmarks import Report, decode_rate, random_lavin, same_tokens, shapes_model
from evaluate import evaluate
from lavin import LLAMA_SIZES, VIT_L14
from model import ModelArgs


def bench_sample(device, dtype, quick=False, big=None):
    """sample.py: decode tokens/s at batch 1 and 16 (prefill excluded: one prefill, then timed
    one-token steps with the KV cache, the routing computed once), eager and --compile, and, on
    the CPU, evaluation problems/s on the shapes test split (early stop, as `python sample.py
    --dataset shapes`)."""
    if (device.type != "cpu") if big is None else big:  # LaVIN-7B on a GPU
        # The static step attends to all max_seq_len slots: 640 hold the prompt's 517 and 65 new tokens.
        args = dataclasses.replace(LLAMA_SIZES["7B"], max_seq_len=640)
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
            lines.append(f"  decode, batch 1, 100-token context, --compile: {compiled:,.0f} tokens/s "
                         f"({compiled / rate:.1f}x "
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
    title = (f"sample.py, LaVIN with random weights (LLaMA dim {args.dim} x {args.n_layers} layers), "
             f"{device.type} {dtype}")
    lines, eager = Report(), {}
    lines.append(title)
    for B in (1,) if quick else (1, 16):
        eager[B] = decode_rate(model, B, 512, 64, device, dtype)  # (tokens/s, tokens)
        lines.append(f"  decode, batch {B}, 512-token context, eager: {eager[B][0]:,.1f} tokens/s")
    decoder = generate.StaticDecoder(model.llama)  # one for both batch sizes, as in an evaluation
    for B, (eager_rate, want) in eager.items():
        t0 = time.perf_counter()
        rate, got = decode_rate(model, B, 512, 64, device, dtype, decoder)
        lines.append(f"  decode, batch {B}, 512-token context, --compile: {rate:,.1f} tokens/s "
                     f"({rate / eager_rate:.1f}x "
                     f"eager; {time.perf_counter() - t0:.0f} s to compile and run), {same_tokens(got, want)}")
    return lines
