"""Evaluation, the same loop for every dataset: generate an answer to each prompt of a split, then
let the dataset score them.

    task (from data.evaluation: the dataset's prompts, images, stop rule, scoring and table)
      └─ prompts sorted longest first; rank r of W takes every W-th; batches of batch_size
           └─ generate.generate: greedy, each row stopped by task.stop(text) or at EOS
      └─ {id: text} of every rank gathered on rank 0 ─> task.score(texts) ─> result, files
           ─> output_dir: results.json (result + decode steps), outputs.json (the texts), files
              (ScienceQA: preds.json), and the table printed

What a task provides (ScienceQA's and the shapes set's in data/table.py, MME's in data/mme.py,
held-out text instructions' in data/instruct.py, COCO's in data/captions.py):
    task.name, task.split      what is evaluated (for the result)
    task.dataset               a TokenizedDataset: .samples (pid, turns, image path), .load_image
    task.stop(text) -> bool    True once the answer can no longer change (early stop)
    task.score(texts) -> (result dict, {file name: JSON object})
    task.table(result) -> str  what is printed
    task.max_new_tokens        optional: the benchmark's own cap on new tokens (MME: 20)
Adding a dataset's evaluation means writing such a task in its data module, not changing this loop.
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from generate import StaticDecoder, generate
from lavin import LaVIN


@torch.inference_mode()
def evaluate(model: LaVIN, tokenizer, task, *, batch_size: int = 16, max_new_tokens: int = 64,
             early_stop: bool = True, rank: int = 0, world_size: int = 1, device=None,
             autocast_dtype=None, progress: bool = True, stats: dict | None = None,
             compile: bool = False) -> dict[str, str]:
    """{pid: generated text} for this rank's shard of the task's prompts. Each prompt is encoded
    alone, as the official evaluation does. stats receives "row_steps" (tokens decoded, summed
    over the rows of every batch: what the compute costs) and "problems". compile: decode with
    one StaticDecoder for all batches."""
    from tqdm import tqdm

    model = getattr(model, "module", model)  # a DDP wrapper
    device = torch.device(device or model.llama.tok_embeddings.weight.device)
    was_training = model.training
    model.eval()
    dataset = task.dataset
    samples = dataset.samples
    prompts = [tokenizer.encode(s.turns[0][0], bos=True, eos=False) for s in samples]
    inserted = model.inserted(torch.tensor([s.image is not None for s in samples])).tolist()
    size = [len(p) + n for p, n in zip(prompts, inserted)]  # positions each prompt takes
    # A prompt with no room left for one new token is skipped, not allowed to stop the evaluation:
    # it is answered "" (an unparsed answer in ScienceQA's table, an empty caption), and named.
    limit = model.llama.args.max_seq_len
    too_long = [i for i in range(len(samples)) if size[i] >= limit]
    if too_long and rank == 0:
        named = ", ".join(f"{samples[i].pid} ({size[i]})" for i in too_long[:10]) + " ..." * (len(too_long) > 10)
        warnings.warn(f"{len(too_long)} prompt(s) of {dataset.name} take max_seq_len={limit} positions or more "
                      f"and were skipped, answered with an empty text (unparsed in ScienceQA's table): problem "
                      f"{named}", stacklevel=2)
    # Longest first (an out-of-memory shows at once); striding keeps the ranks' lengths alike.
    order = sorted(set(range(len(samples))) - set(too_long), key=lambda i: (-size[i], i))[rank::world_size]
    R = model.visual.resolution
    texts, row_steps = ({samples[i].pid: "" for i in too_long} if rank == 0 else {}), 0
    stop = (lambda row, ids: task.stop(tokenizer.decode(ids))) if early_stop else None
    decoder = StaticDecoder(model.llama) if compile else None
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    # The bar is a context: stopped midway (Ctrl-C), it still ends its line before what is said next.
    with tqdm(batches, desc="evaluating", unit="batch", disable=not progress or rank != 0) as bar:
        for idx in bar:
            rows = [samples[i] for i in idx]
            ind = torch.tensor([s.image is not None for s in rows], dtype=torch.long, device=device)
            images = None
            if ind.any():
                images = torch.stack([dataset.load_image(s.pid, s.image) if s.image else torch.zeros(3, R, R)
                                      for s in rows]).to(device)
            # The longest row's room is the batch's budget (the official code cuts it the same way).
            budget = max(1, min(max_new_tokens, model.llama.args.max_seq_len - max(size[i] for i in idx)))
            st = {}
            cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
            with cast:
                outs = generate(model, tokenizer, [prompts[i] for i in idx], images, ind, budget, stop=stop,
                                stats=st, decoder=decoder)
            row_steps += st["steps"] * len(idx)
            texts.update({s.pid: tokenizer.decode(o) for s, o in zip(rows, outs)})
    model.train(was_training)
    if stats is not None:
        stats.update(row_steps=row_steps, problems=len(order))
    return texts


def evaluate_split(model: LaVIN, tokenizer, task, *, output_dir: str, batch_size: int = 16,
                   max_new_tokens: int = 64, early_stop: bool = True, rank: int = 0, world_size: int = 1,
                   device=None, autocast_dtype=None, progress: bool = True, compile: bool = False) -> dict | None:
    """Evaluate the task across all ranks; rank 0 scores the gathered texts, writes results.json,
    outputs.json ({pid: text}) and the task's own files into output_dir, prints the table and
    returns the result (None on the other ranks)."""
    max_new_tokens = min(max_new_tokens, getattr(task, "max_new_tokens", max_new_tokens))  # MME: 20
    stats, t0 = {}, time.perf_counter()
    texts = evaluate(model, tokenizer, task, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     early_stop=early_stop, rank=rank, world_size=world_size, device=device,
                     autocast_dtype=autocast_dtype, progress=progress, stats=stats, compile=compile)
    parts = [(texts, stats)]
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        parts = [None] * world_size
        dist.all_gather_object(parts, (texts, stats))
    if rank != 0:
        return None
    seconds = time.perf_counter() - t0  # every rank's shard, gathered: the evaluation's wall time (printed,
    # not written: results.json holds what the same run gives again)
    texts = {pid: t for part, _ in parts for pid, t in part.items()}
    n = sum(st["problems"] for _, st in parts)
    result, files = task.score(texts)
    result.update(decode_steps_per_problem=round(sum(st["row_steps"] for _, st in parts) / max(n, 1), 2),
                  reference_steps_per_problem=max_new_tokens, early_stop=early_stop)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in {**files, "results.json": result, "outputs.json": texts}.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    print(task.table(result))
    kind = "compiled" if compile else "eager"
    print(f"{n} problems in {seconds:.1f} s ({n / seconds:,.1f} problems/s, {kind} decode), "
          f"decode steps per problem: {result['decode_steps_per_problem']} (the reference: {max_new_tokens}); "
          f"wrote {out / 'results.json'}, {', '.join([*files, 'outputs.json'])}")
    return result
