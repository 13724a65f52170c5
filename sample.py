"""Talking to a trained LaVIN: one image and a prompt, a terminal chat, batched ScienceQA evaluation.

    python sample.py --run out/shapes --image data/shapes/images/test/<pid>/image.png \\
        --prompt "Question: Which color is the shape?\\nContext: N/A\\nOptions: (A) red (B) blue\\nResponse:"
    python sample.py --llama_path weights/vicuna-7b --clip_path weights/ViT-L-14.pt --adapters a.pth --image cat.jpg
    python sample.py --run out/shapes                          # evaluate the run on its test split
    torchrun --nproc_per_node 8 sample.py --dataset scienceqa --adapters checkpoint-19.pth \\
        --llama_path weights/7B --clip_path weights/ViT-L-14.pt

Generation (Meta's batched decoding, plus LaVIN's insertion and routing):

    prompt ids ─LaVIN.embed─> [BOS] "Image: " <visual tokens> prompt     (or [BOS] "Image: N/A" prompt)
      └─ each row cut to its own length, left-padded to the longest ─> one prefill into the KV cache
         (pad slots masked, positions counted from each row's first real token, + 1 as in training)
    modality token ─> router weights of every block, computed once, reused by every decode step
    loop: greedy or temperature + top-p ─> feed the token ─> next logits; a row ends at EOS or
          when `stop` says so ("The answer is X." decoded, in evaluation); the batch ends with its last row
          (--compile: each step by StaticDecoder, shapes fixed, compiled; one CUDA graph launch on a GPU)

Evaluation: prompts sorted by length, rank r of W takes every W-th, in batches; the texts are
gathered on rank 0 -> data/table.py -> preds.json, results.json, outputs.json and the table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
from data.instruct import instruction_prompt
from data.scienceqa import DataError, read_release, split_pids
from data.table import ANSWER_PATTERN, format_table, score, to_indices
from lavin import LaVIN, LaVINArgs, load_adapters, load_lavin, read_adapters
from model import KVCache, Llama
from router import IMAGE, TEXT


@dataclass
class SampleConfig:
    # the weights
    run: str = ""  # a train.py output_dir: its adapters.pth, and every path below not given from its config
    llama_path: str = ""  # LLaMA folder (Meta's or Hugging Face's layout)
    clip_path: str = ""  # OpenAI CLIP checkpoint (ViT-L-14.pt)
    adapters: str = ""  # our adapters.pth or the official checkpoint-19.pth; "" = untrained (the plain backbones)
    # one prompt, or a chat
    image: str = ""  # an image file; "" = text only (the router takes the text path)
    prompt: str = ""  # the two characters \n become a newline
    chat: bool = False  # a conversation about --image in the terminal (also: --image without --prompt)
    template: str = "auto"  # raw: the prompt as typed | instruction: "Instruction: {prompt}\nResponse:"
    #                         auto: raw for a run trained on scienceqa/shapes, else instruction
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64
    fold: bool = True  # fold the one modality's routing into the weights (prompt, chat): plain LLaMA's cost
    # evaluation
    dataset: str = ""  # scienceqa | shapes: evaluate on --split ("" with --run: the run's dataset)
    split: str = "test"
    data_path: str = ""  # "" = the run's, else data/{dataset}
    prompt_format: str = ""  # "" = the run's, else QCM-ALE
    output_dir: str = ""  # "" = {run}/eval-{split}, else out/eval/{dataset}-{split}
    batch_size: int = 16
    early_stop: bool = True  # end a row at "The answer is X." (--no-early_stop: every token, as the reference)
    # the machine
    max_seq_len: int = 0  # 0 = the run's, else 512 (the official evaluation's)
    image_mode: str = ""  # lavin | clip (see clip.preprocess); "" = the run's, else lavin
    device: str = ""  # "" = cuda if there is one, else cpu
    compile: bool = False  # decode steps of fixed shapes, torch.compile'd (a CUDA graph on a GPU); see StaticDecoder
    precision: str = "auto"  # auto (bf16, or fp16 without bf16, on GPU; fp32 on CPU) | bf16 | fp16 | fp32


EVAL_DATASETS = ("scienceqa", "shapes")
CHOICES = {"dataset": ("", *EVAL_DATASETS), "template": ("auto", "raw", "instruction"),
           "image_mode": ("", "lavin", "clip"), "precision": ("auto", "bf16", "fp16", "fp32")}


class UsageError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


class ContextTooLong(ValueError):
    """A prompt plus the tokens asked for do not fit the model's max_seq_len."""


# ----------------------------------------------------------------------------- generation

def sample_next(logits, temperature: float, top_p: float, generator=None):
    """Next token per row from logits (B, vocab): argmax, or a draw from the smallest set of tokens
    whose probability reaches top_p, at the given temperature."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    p, idx = probs.sort(-1, descending=True)
    p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)  # the most likely token always stays
    return idx.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(-1)


def prefill_embeddings(model: LaVIN, prompts, images=None, img_indicator=None):
    """(x (B, L, dim), pad (B,), indicator (B,)): each row's embedding sequence as training builds
    it, left-padded with pad[b] zero slots to the longest row L. No indicator means text only."""
    device = model.llama.tok_embeddings.weight.device
    B = len(prompts)
    if B == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    ind = torch.zeros(B, dtype=torch.long, device=device) if img_indicator is None else img_indicator.to(device).long()
    if model.folded is not None and bool((ind != model.folded).any()):
        raise ValueError(f"this model's routing is folded for modality {model.folded} only")
    T = max(map(len, prompts))
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, device=device)
    h, _ = model.embed(tokens, None if images is None else images.to(device), ind)  # (B, T + E, dim)
    lengths = torch.tensor([len(p) for p in prompts], device=device) + model.inserted(ind)  # (B,) real positions
    L = int(lengths.max())
    pad = L - lengths
    j = torch.arange(L, device=device)[None]  # (1, L)
    src = (j - pad[:, None]).clamp(min=0)  # (B, L): slot j holds position j - pad of the row
    x = h.gather(1, src[..., None].expand(-1, -1, h.shape[-1]))  # (B, L, dim)
    return x.masked_fill((j < pad[:, None])[..., None], 0.0), pad, ind


def cache_dtype(x: torch.Tensor):
    """Keys and values come out of the linear layers in autocast's dtype when it is on."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class StaticDecoder:
    """One-token decode steps by Llama.decode_step, whose shapes never change, compiled unless
    compile=False. On CUDA, mode="reduce-overhead" captures the step in a CUDA graph: a step is
    then one graph launch instead of hundreds of kernel launches, which bound the eager loop at
    batch 1 (it runs far below the speed of reading the weights). A graph reads its KV cache at
    the addresses it was captured with, so the decoder keeps one cache of max_seq_len slots per
    batch size and hands it out again, emptied, to every batch of that size."""

    def __init__(self, llama: Llama, compile: bool = True):
        self.llama, self.caches, self.step = llama, {}, llama.decode_step
        if compile:
            cuda = llama.tok_embeddings.weight.device.type == "cuda"
            import torch._inductor.config as inductor

            options = {"triton.cudagraphs": cuda}  # what mode="reduce-overhead" sets (mode excludes options)
            if hasattr(inductor, "emulate_precision_casts"):  # not in every torch the requirements allow
                # Fused kernels round to bf16/fp16 where eager does: else the tokens drift from eager's.
                options["emulate_precision_casts"] = True
            # dynamic=False: one graph per batch size (an evaluation has two, its batch and its last)
            self.step = torch.compile(llama.decode_step, options=options, fullgraph=True, dynamic=False)

    def cache(self, batch: int, pad, dtype) -> KVCache:
        """The cache for `batch` rows with left padding pad (B,) (None: none), emptied."""
        cache = self.caches.get((batch, dtype))
        if cache is None:
            cache = KVCache(self.llama.args, batch, device=self.llama.tok_embeddings.weight.device, dtype=dtype)
            for t in cache.k + cache.v:  # a graph input at a fixed address: written in place, not copied in
                torch._dynamo.mark_static_address(t)
            self.caches[batch, dtype] = cache
        cache.reset(pad)
        return cache

    def __call__(self, embeds, cache: KVCache, routes, pos_offset: int):
        """Logits (B, vocab) of embeds (B, 1, dim) fed at the cache's next slot."""
        slot = torch.tensor([cache.len], device=embeds.device)  # a tensor: one graph serves every slot
        # The last step's logits are used up: the graph may overwrite its outputs in this step.
        torch.compiler.cudagraph_mark_step_begin()
        logits = self.step(embeds, cache, slot, routes, pos_offset)
        cache.len += 1
        return logits


@torch.inference_mode()
def decode(model: LaVIN, tokenizer, cache: KVCache, routes, x, max_new_tokens: int, temperature=0.0,
           top_p=1.0, generator=None, stop=None, on_token=None, decoder: StaticDecoder | None = None):
    """Feed embeddings x (B, T, dim) into the cache, then sample up to max_new_tokens per row.
    Returns (new tokens per row without EOS, whether each row ended at EOS, decode steps). The
    last token sampled is never fed: a caller that goes on (chat) feeds it first. x always runs
    through the eager forward; the one-token steps through decoder if given (cache must be its)."""
    if cache.len + x.shape[1] + max_new_tokens - 1 > cache.max_len:
        raise ContextTooLong(f"{cache.len + x.shape[1]} positions + {max_new_tokens} new tokens do not "
                             f"fit the context of {cache.max_len}")
    B, eos = x.shape[0], tokenizer.eos_id
    out, alive, at_eos = [[] for _ in range(B)], [True] * B, [False] * B
    # Only the last position's logits are needed: norm and output on it alone (a 500-token batch
    # of 16 would otherwise make a GiB of fp32 logits for nothing).
    h = model.llama(embeds=x, cache=cache, routes=routes, pos_offset=1, head=False)[:, -1]  # (B, dim)
    logits = model.llama.output(model.llama.norm(h))
    steps = 0
    while True:
        nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
        steps += 1
        for b, t in enumerate(nxt.tolist()):  # one host sync per step: stop needs the ids anyway
            if not alive[b]:
                continue
            if t == eos:
                alive[b], at_eos[b] = False, True
                continue
            out[b].append(t)
            if on_token is not None:
                on_token(b, out[b])
            if stop is not None and stop(b, out[b]):
                alive[b] = False
        if not any(alive) or steps == max_new_tokens:
            return out, at_eos, steps
        # Rows that ended keep decoding (their tokens are dropped): the batch keeps one shape.
        emb = model.llama.tok_embeddings(nxt[:, None])  # (B, 1, dim)
        if decoder is None:
            logits = model.llama(embeds=emb, cache=cache, routes=routes, pos_offset=1)[:, -1]
        else:
            logits = decoder(emb, cache, routes, pos_offset=1)


@torch.inference_mode()
def generate(model: LaVIN, tokenizer, prompts: list[list[int]], images=None, img_indicator=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, generator=None,
             stop=None, on_token=None, stats: dict | None = None,
             decoder: StaticDecoder | None = None) -> list[list[int]]:
    """New tokens for each prompt (token ids starting with BOS), cut before EOS.

    images (B, 3, R, R) and img_indicator (B,) as in training (1 = the row shows its image; None:
    all text). Greedy when temperature is 0. stop(row, new_ids) -> True ends a row early;
    on_token(row, new_ids) is called after each token a row gets (streaming). stats, if given,
    receives "steps": the tokens sampled per row, the batch's last row included. decoder: a
    StaticDecoder (--compile) for the one-token steps, in its own cache; None: the eager forward.
    Pass one decoder to every call: a new one would allocate and capture its graph anew.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    x, pad, ind = prefill_embeddings(model, prompts, images, img_indicator)
    B, L = x.shape[:2]
    limit = model.llama.args.max_seq_len
    if L - int(pad.min()) + max_new_tokens > limit:
        b = int(pad.argmin())
        raise ContextTooLong(f"prompt {b} takes {L} positions ({len(prompts[b])} tokens + {L - len(prompts[b])} "
                             f"inserted); with max_new_tokens={max_new_tokens} that exceeds max_seq_len={limit}")
    routes = model.routes(ind, B, x.device, x.dtype)  # once, for every step
    if decoder is None:
        cache = KVCache(model.llama.args, B, L + max_new_tokens, pad=pad, device=x.device, dtype=cache_dtype(x))
    else:
        cache = decoder.cache(B, pad, cache_dtype(x))
    out, _, steps = decode(model, tokenizer, cache, routes, x, max_new_tokens, temperature, top_p,
                           generator, stop, on_token, decoder)
    if stats is not None:
        stats["steps"] = steps
    return out


class Stream:
    """An on_token callback that prints one row's answer as it grows. The whole answer is decoded
    each time because sentencepiece decodes a lone piece without its leading space; text ending
    in U+FFFD is half a UTF-8 character whose other bytes are still to come."""

    def __init__(self, tokenizer, write=None):
        self.tok, self.shown = tokenizer, ""
        self.write = write or (lambda s: print(s, end="", flush=True))

    def __call__(self, row, ids, final: bool = False):
        text = self.tok.decode(ids)
        if text.startswith(self.shown) and (final or not text.endswith("\ufffd")):
            self.write(text[len(self.shown):])
            self.shown = text


# ----------------------------------------------------------------------------- evaluation

def answer_stop(tokenizer):
    """stop() for evaluation: the letter is known once "The answer is X." is decoded, and the
    table reads the first match, so nothing after it can change the prediction."""
    return lambda row, ids: ANSWER_PATTERN.search(tokenizer.decode(ids)) is not None


@torch.inference_mode()
def evaluate(model: LaVIN, tokenizer, dataset, *, batch_size: int = 16, max_new_tokens: int = 64,
             early_stop: bool = True, rank: int = 0, world_size: int = 1, device=None,
             autocast_dtype=None, progress: bool = True, stats: dict | None = None,
             compile: bool = False) -> dict[str, str]:
    """{pid: generated text} for this rank's shard of a TokenizedDataset (ScienceQA layout). Each
    prompt is encoded alone, as the official evaluation does. stats receives "row_steps" (tokens
    decoded, summed over the rows of every batch: what the compute costs) and "problems".
    compile: decode with one StaticDecoder for all batches."""
    from tqdm import tqdm

    model = getattr(model, "module", model)  # a DDP wrapper
    device = torch.device(device or model.llama.tok_embeddings.weight.device)
    was_training = model.training
    model.eval()
    samples = dataset.samples
    prompts = [tokenizer.encode(s.turns[0][0], bos=True, eos=False) for s in samples]
    inserted = model.inserted(torch.tensor([s.image is not None for s in samples])).tolist()
    size = [len(p) + n for p, n in zip(prompts, inserted)]  # positions each prompt takes
    # Longest first (an out-of-memory shows at once); striding keeps the ranks' lengths alike.
    order = sorted(range(len(samples)), key=lambda i: -size[i])[rank::world_size]
    R = model.visual.resolution
    texts, row_steps = {}, 0
    stop = answer_stop(tokenizer) if early_stop else None
    decoder = StaticDecoder(model.llama) if compile else None
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc="evaluating", unit="batch", disable=not progress or rank != 0):
        rows = [samples[i] for i in idx]
        ind = torch.tensor([s.image is not None for s in rows], dtype=torch.long, device=device)
        images = None
        if ind.any():
            images = torch.stack([dataset.load_image(s.pid, s.image) if s.image else torch.zeros(3, R, R)
                                  for s in rows]).to(device)
        # The longest row's room is the batch's budget (the official code cuts it the same way).
        budget = max(1, min(max_new_tokens, model.llama.args.max_seq_len - max(size[i] for i in idx)))
        st = {}
        with torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            outs = generate(model, tokenizer, [prompts[i] for i in idx], images, ind, budget, stop=stop, stats=st,
                            decoder=decoder)
        row_steps += st["steps"] * len(idx)
        texts.update({s.pid: tokenizer.decode(o) for s, o in zip(rows, outs)})
    model.train(was_training)
    if stats is not None:
        stats.update(row_steps=row_steps, problems=len(order))
    return texts


def evaluate_split(model: LaVIN, tokenizer, *, dataset_name: str, data_path: str | None, split: str,
                   prompt_format: str, batch_size: int, output_dir: str, image_mode: str = "lavin",
                   max_new_tokens: int = 64, early_stop: bool = True, rank: int = 0, world_size: int = 1,
                   device=None, autocast_dtype=None, progress: bool = True, compile: bool = False) -> dict | None:
    """Evaluate on a ScienceQA-layout split across all ranks; rank 0 writes preds.json ({pid: choice
    index or -1}), results.json (the table, decode steps) and outputs.json ({pid: text}) into
    output_dir, prints the table and returns the results (None on the other ranks)."""
    if dataset_name not in EVAL_DATASETS:
        raise UsageError(f"cannot evaluate on {dataset_name!r}: use one of {', '.join(EVAL_DATASETS)}")
    core = getattr(model, "module", model)
    root = data_path or data.DEFAULT_ROOTS[dataset_name]
    ds = data.build_dataset(dataset_name, root, split, tokenizer, prompt_format=prompt_format,
                            image_mode=image_mode, resolution=core.visual.resolution)
    stats = {}
    texts = evaluate(core, tokenizer, ds, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     early_stop=early_stop, rank=rank, world_size=world_size, device=device,
                     autocast_dtype=autocast_dtype, progress=progress, stats=stats, compile=compile)
    parts = [(texts, stats)]
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        parts = [None] * world_size
        dist.all_gather_object(parts, (texts, stats))
    if rank != 0:
        return None
    texts = {pid: t for part, _ in parts for pid, t in part.items()}
    row_steps = sum(st["row_steps"] for _, st in parts)
    problems, splits = read_release(root)
    pids = split_pids(splits, split, root, problems)
    preds = to_indices(texts, problems, pids)
    result = {"dataset": dataset_name, "split": split, "prompt_format": prompt_format, **score(problems, pids, preds),
              "decode_steps_per_problem": round(row_steps / max(len(pids), 1), 2),
              "reference_steps_per_problem": max_new_tokens, "early_stop": early_stop}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in (("preds.json", preds), ("results.json", result), ("outputs.json", texts)):
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    print(format_table(result, split))
    print(f"decode steps per problem: {result['decode_steps_per_problem']} (the reference: {max_new_tokens}); "
          f"wrote {out / 'results.json'}, preds.json, outputs.json")
    return result


# ----------------------------------------------------------------------------- the command line

def make_config(argv=None) -> SampleConfig:
    p = argparse.ArgumentParser(description="Ask a trained LaVIN about an image, chat with it, or evaluate it.")
    for f in dataclasses.fields(SampleConfig):
        if f.type == "bool":
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type],
                           default=f.default, choices=CHOICES.get(f.name))
    return SampleConfig(**vars(p.parse_args(argv)))


def message(e: BaseException) -> str:
    return e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)  # KeyError quotes str()


def read_checkpoint(path) -> dict:
    try:
        return read_adapters(path)
    except FileNotFoundError as e:
        raise UsageError(message(e)) from e
    except KeyError as e:
        raise UsageError(f"{path} is not an adapter checkpoint (no 'model' entry)") from e
    except Exception as e:  # a damaged or foreign file fails in many ways; all are the user's to fix
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__})") from e


def lavin_args(ckpt: dict | None) -> LaVINArgs:
    """The adapters' shape: ours are saved with it, the official Namespace names it."""
    if ckpt is None:
        return LaVINArgs()
    if "lavin_args" in ckpt:
        return LaVINArgs(**ckpt["lavin_args"])
    ns = ckpt.get("args")  # what lavin.check_official_args compares, read the other way
    keys = ("adapter_dim", "temperature", "hidden_proj", "adapter_scale")
    named = {k: getattr(ns, k) for k in keys if hasattr(ns, k)}
    return LaVINArgs(**named, adapter_mlp=getattr(ns, "adapter_type", "attn") == "block")


def resolve(cfg: SampleConfig) -> tuple[SampleConfig, str]:
    """(the config with every default filled in, the mode: prompt | chat | eval)."""
    trained_on, run = "", {}
    if cfg.run:
        path = Path(cfg.run) / "adapters.pth"
        if not path.is_file():
            raise UsageError(f"--run {cfg.run}: no adapters.pth there (a train.py --output_dir holds one)")
        run = read_checkpoint(path).get("config") or {}
        trained_on = run.get("dataset", "")
        cfg = dataclasses.replace(cfg, adapters=cfg.adapters or str(path))
    fill = {k: getattr(cfg, k) or run.get(k) or default for k, default in
            (("llama_path", ""), ("clip_path", ""), ("prompt_format", "QCM-ALE"), ("max_seq_len", 512),
             ("image_mode", "lavin"))}
    cfg = dataclasses.replace(cfg, **fill)
    if cfg.chat or (cfg.image and not cfg.prompt):
        mode = "chat"
    elif cfg.prompt:
        mode = "prompt"
    else:
        mode = "eval"
        dataset = cfg.dataset or (trained_on if trained_on in EVAL_DATASETS else "")
        if not dataset:
            raise UsageError("nothing to do: give --prompt, --image (a chat) or --dataset scienceqa|shapes")
        own = run.get("data_path") if dataset == trained_on else ""  # the run's copy of this dataset
        out = f"{cfg.run}/eval-{cfg.split}" if cfg.run else f"out/eval/{dataset}-{cfg.split}"
        cfg = dataclasses.replace(cfg, dataset=dataset, output_dir=cfg.output_dir or out,
                                  data_path=cfg.data_path or own or data.DEFAULT_ROOTS[dataset])
    if cfg.dataset and mode != "eval":
        raise UsageError("--dataset evaluates: leave out --prompt, --image and --chat")
    if not cfg.llama_path or not cfg.clip_path:
        raise UsageError("give --llama_path and --clip_path, or --run OUT (a train.py output_dir)")
    if cfg.template == "auto":
        cfg = dataclasses.replace(cfg, template="raw" if trained_on in EVAL_DATASETS else "instruction")
    return cfg, mode


def load_model(cfg: SampleConfig, device, dtype):
    ckpt = read_checkpoint(cfg.adapters) if cfg.adapters else None
    try:
        model, tok = load_lavin(cfg.llama_path, cfg.clip_path, lavin_args(ckpt), dtype=dtype, device=device,
                                max_seq_len=cfg.max_seq_len)
    except (OSError, KeyError, ValueError, TypeError) as e:  # missing or foreign weight files
        raise UsageError(message(e)) from e
    if cfg.adapters:
        try:
            load_adapters(model, cfg.adapters, ckpt)  # read once, above
        except (KeyError, ValueError) as e:
            raise UsageError(f"{message(e)} (adapters for another model than {cfg.llama_path} + "
                             f"{cfg.clip_path})") from e
    else:
        print("note: no --adapters: the adapters are untrained, this is the plain LLaMA + CLIP", file=sys.stderr)
    return model.eval(), tok


def read_image(path: str, model: LaVIN, mode: str) -> torch.Tensor:
    import clip

    try:
        return clip.preprocess(clip.load_image(path), mode=mode, resolution=model.visual.resolution)
    except FileNotFoundError as e:
        raise UsageError(f"no image at {path}") from e
    except (OSError, ValueError) as e:
        raise UsageError(message(e)) from e


def typed_lines(read=input):
    """The user's turns: lines until an empty one or the end of input."""
    while True:
        try:
            text = read("you> ")
        except EOFError:
            return
        if not text.strip():
            return
        yield text


@torch.inference_mode()
def converse(model: LaVIN, tok, cfg: SampleConfig, image, turns, prefix: str = "") -> list[str]:
    """Answer each turn, streamed to stdout, in the conversation format of the instruction data
    (BOS turn1 EOS turn2 EOS ...); the KV cache keeps the conversation, so a turn costs only its
    own tokens. One turn is `--prompt`, typed_lines() is `--chat`. Returns the answers."""
    device = model.llama.tok_embeddings.weight.device
    ind = torch.tensor([IMAGE if image is not None else TEXT], device=device)
    if cfg.fold:
        model.fold(int(ind))
    decoder = StaticDecoder(model.llama) if cfg.compile else None  # after folding: it compiles what it sees
    cache = routes = None
    pending, answers = [], []  # pending: sampled but not yet fed (the last answer token, EOS)
    for text in turns:
        text = text.replace("\\n", "\n")
        prompt = text if cfg.template == "raw" else instruction_prompt(text)
        if cache is None:  # the first turn carries BOS and the image
            ids = tok.encode(prompt, bos=True, eos=False)
            x, _, _ = prefill_embeddings(model, [ids], None if image is None else image[None], ind)
            limit = model.llama.args.max_seq_len
            if x.shape[1] + cfg.max_new_tokens > limit:
                raise ContextTooLong(f"the prompt takes {x.shape[1]} positions ({len(ids)} tokens + "
                                     f"{x.shape[1] - len(ids)} inserted); with max_new_tokens="
                                     f"{cfg.max_new_tokens} that exceeds max_seq_len={limit}")
            routes = model.routes(ind, 1, device, x.dtype)
            cache = KVCache(model.llama.args, 1, limit, device=device, dtype=cache_dtype(x)) if decoder is None \
                else decoder.cache(1, None, cache_dtype(x))
        else:
            x = model.llama.tok_embeddings(torch.tensor([pending + tok.encode(prompt, bos=False, eos=False)],
                                                        device=device))  # (1, T, dim)
        room = cache.max_len - cache.len - x.shape[1] + 1
        if room < 1:
            print(f"(the conversation fills the context of {cache.max_len} positions: start a new chat)")
            break
        print(prefix, end="", flush=True)
        stream = Stream(tok)
        out, at_eos, _ = decode(model, tok, cache, routes, x, min(cfg.max_new_tokens, room), cfg.temperature,
                                cfg.top_p, on_token=stream, decoder=decoder)
        stream(0, out[0], final=True)  # what was held back: the answer ended inside a character
        print(flush=True)
        pending = ([] if at_eos[0] else out[0][-1:]) + [tok.eos_id]  # every turn ends in EOS, as in training
        answers.append(tok.decode(out[0]))
    return answers


def main(cfg: SampleConfig):
    """The answer (--prompt), the answers (chat) or the results dict (evaluation; None off rank 0)."""
    cfg, mode = resolve(cfg)
    from train import pick_dtype, setup_distributed  # torchrun's environment, one precision rule

    rank, world, device = setup_distributed(cfg.device)
    if cfg.compile and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UsageError("--compile on a GPU needs triton (pip install triton); or leave out --compile")
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg, device, pick_dtype(cfg.precision, device))
    image = read_image(cfg.image, model, cfg.image_mode).to(device) if cfg.image else None
    try:
        if mode == "eval":
            return evaluate_split(model, tok, dataset_name=cfg.dataset, data_path=cfg.data_path, split=cfg.split,
                                  prompt_format=cfg.prompt_format, batch_size=cfg.batch_size,
                                  output_dir=cfg.output_dir, image_mode=cfg.image_mode,
                                  max_new_tokens=cfg.max_new_tokens, early_stop=cfg.early_stop, rank=rank,
                                  world_size=world, device=device, compile=cfg.compile)
        if mode == "chat":
            return converse(model, tok, cfg, image, typed_lines(), prefix="lavin> ")
        return converse(model, tok, cfg, image, [cfg.prompt])[0]
    except ContextTooLong as e:
        raise UsageError(f"{e}: shorten the prompt, lower --max_new_tokens or raise --max_seq_len") from e


if __name__ == "__main__":
    try:
        main(make_config())
    except (UsageError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {message(e)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
