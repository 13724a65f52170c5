"""What the benchmarks share (bench.py runs them): printing as lines are measured, timing with
the GPU synchronised, peak memory, LaVIN models and batches to time (the shapes model on the CPU,
random weights of LaVIN-7B's sizes on a GPU), train.py's training step, and decode throughput.

    benchmarks/training.py   bench.py --only train | e2e   (the training step; train.py + sample.py)
    benchmarks/decoding.py   bench.py --only sample        (sample.py's decoding and evaluation)
    benchmarks/lite.py       bench.py --only lite          (LaVIN-lite at 16 / 8 / 4 bits)
"""
import itertools
import resource
import time

import torch

import clip
import generate
from lavin import LaVIN, LaVINArgs, load_lavin
from model import KVCache, Llama, ModelArgs


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
    """Seconds per call, after one warm-up call; reps 0: the seconds of that one call."""
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if reps == 0:
        return time.perf_counter() - t0
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
    opt = train.make_optimizer(model, train.TrainConfig(), 1e-4, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cycle = itertools.cycle(batches)
    step = lambda: train.train_step(model, [next(cycle)], opt, None, autocast, device, 1)  # noqa: E731
    first = timed(step, device, 0)  # warm-up, and compilation
    s = timed(step, device, reps)
    n, T = batches[0]["tokens"].shape
    line = f"  {label}: {n / s:,.1f} samples/s, {n * T / s:,.0f} tokens/s, peak memory {peak_memory(device)}"
    if flops_per_step and device.type == "cuda":
        line += f", MFU {flops_per_step / s / 989e12:.0%}"
    if first > 10 * s + 5:
        line += f" (first step {first:.0f} s: compiling)"
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


class NoEos:
    """A tokenizer whose EOS never comes: decode runs every step it is asked for."""

    eos_id = -1
    stop_ids = frozenset()


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
            kv_dtype = generate.cache_dtype(x)
            cache = KVCache(model.llama.args, B, x.shape[1] + n, pad=pad, device=device, dtype=kv_dtype) \
                if decoder is None else decoder.cache(B, pad, kv_dtype)
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
