"""Mixture-of-Modality Training (paper, section 3.3): LaVIN's adapters learn, everything else stays frozen.

    python train.py --dataset shapes                        # the laptop run, everything defaulted
    python train.py --dataset shapes-chat                   # the chatbot's laptop run, scored on MME
    torchrun --nproc_per_node 8 train.py --dataset scienceqa --preset lavin-7b \\
        --llama_path weights/7B --clip_path weights/ViT-L-14.pt --data_path data/scienceqa --output_dir out/lavin-7b
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...

    TrainConfig ─(preset, then explicit flags)─> load LLaMA + CLIP (frozen, bf16/fp16 on GPU) + fresh fp32 adapters
      └─ per optimizer step: accum_iter micro-batches of image and text-only samples, mixed
           loss = sum of answer-token cross-entropies / answer tokens of the whole step (all ranks)
           DDP all-reduces the adapters' gradients (no_sync on the non-final micro-steps)
           AdamW, lr from the fractional epoch (warm-up, then half-cycle cosine to 0)
      └─ output_dir: log.jsonl (a line per step), checkpoint.pth (--resume), adapters.pth (sample.py),
                     results.json + preds.json (the accuracy table, by evaluate.py; a chatbot:
                     eval-mme/ and eval-alpaca/, when its data folder holds mme/ and alpaca_test.json)

Read it from the bottom: main() runs setup() (inputs checked, model, data, optimizer, --resume),
train_loop() (a train_step() per optimizer step, checkpoints) and finish() (the evaluation,
samples.png); the settings and the paper's presets are config.py's.

The loss is normalised by the answer tokens of the whole optimizer step across all processes,
so the gradient is the same for 1 process with batch 2b and 2 with batch b (the reference
averages per-micro-batch means, which weights samples by the length of their neighbours' answers
and makes accuracy depend on the GPU count).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import clip
import curves
import data
from checkpoint import ADAPTERS, CHECKPOINT, LOG, carries_on, find_resume, open_log, restore, save_checkpoint
from config import TrainConfig, check_inputs, check_output, dry_run, evaluations, lavin_args, make_config, resolve
from data.batching import IGNORE_INDEX
from data.table import show_samples
from evaluate import evaluate_split
from lavin import LaVIN, compile_blocks, load_lavin
from runtime import (Interrupted, StopRequest, UsageError, busy_cores_note, message, peer_lost, pick_dtype,
                     plain_warnings, setup_distributed, use_compile)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over every rank (in place), or t itself in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- schedule, optimizer

def lr_at(epoch: float, cfg: TrainConfig, lr: float) -> float:
    """Linear warm-up over warmup_epochs, then half a cosine down to 0 at the last epoch; `epoch`
    is fractional (the official loop updates it every iteration)."""
    if epoch < cfg.warmup_epochs:
        return lr * epoch / cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: LaVIN, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and 1-D parameters. On CUDA
    fused: one kernel for all of them; else the multi-tensor (foreach) update, a few ops for all
    parameters instead of a dozen per parameter, and on the CPU the same bits as the plain loop."""
    fused = device.type == "cuda"
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused, foreach=not fused)


# ----------------------------------------------------------------------------- data

def check_images(ds, skip: bool, rank: int, world: int) -> int:
    """Open every image of the split (header and checksums, no decoding) before the first step:
    a corrupt file stops the run now, not hours in. Each rank checks a share. With skip, the
    samples are dropped instead; returns how many."""
    from tqdm import tqdm

    todo = [(i, s) for i, s in enumerate(ds.samples) if s.image is not None][rank::world]
    bad = []
    for i, s in tqdm(todo, desc="checking images", unit="img", disable=rank != 0 or len(todo) < 500,
                     mininterval=2.0):
        try:
            with clip.open_checked(s.image) as im:  # the size limit clip.load_image applies too
                im.verify()
        except Exception as e:
            bad.append((i, s.pid, s.image, f"{type(e).__name__}: {e}"))
    if dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, bad)
        bad = sorted(b for part in parts for b in part)
    if bad and not skip:
        i, pid, path, why = bad[0]
        raise UsageError(f"{len(bad)} image(s) of {ds.name} cannot be read, first: sample {pid}, {path} ({why}); "
                         f"replace them or pass --skip_bad_images to train without those samples")
    ds.drop([b[0] for b in bad])
    return len(bad)


# ----------------------------------------------------------------------------- one optimizer step

def train_step(ddp, micro: list, opt, scaler, autocast, device, world: int) -> tuple[float, float, int]:
    """Forward and backward over the micro-batches of one optimizer step, then the AdamW step.
    Returns (the step's mean loss per answer token over all ranks, the adapters' gradient norm,
    the tokens read over all ranks). The loss is NaN (or inf) when the step was skipped, which
    every rank then does together (they all see the same summed loss)."""
    # The answer tokens of the whole step over every rank (the loss's denominator), and all tokens read.
    counts = all_sum(torch.tensor([float(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro)),
                                   float(sum(b["lengths"].sum() for b in micro))], device=device))
    n_tokens = counts[0]
    scale = world / n_tokens.clamp(min=1)  # DDP averages gradients over ranks: undo that, divide by the total
    loss_sum = torch.zeros((), device=device)
    for j, b in enumerate(micro):
        sync = j == len(micro) - 1 or world == 1  # all-reduce the gradients once, after the last micro-step
        with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items() if torch.is_tensor(v)}
            part = ddp(b["tokens"], b["images"], b["img_indicator"], b["labels"], reduction="sum")
            loss = part * scale
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += part.detach().float()
    if scaler:
        scaler.unscale_(opt)  # the gradients' true size, for their norm; scaler.step does not unscale twice
    # The same on every rank: the gradients are all-reduced. The official loop computes it too.
    grad_norm = torch.nn.utils.get_total_norm([p.grad for g in opt.param_groups for p in g["params"]
                                               if p.grad is not None])
    # NaN when there is nothing to learn from (every answer truncated away); one host sync per step
    loss_value, norm, n_read = torch.stack([torch.where(n_tokens > 0, all_sum(loss_sum) / n_tokens.clamp(min=1),
                                                        float("nan")), grad_norm.float(), counts[1]]).tolist()
    if math.isfinite(loss_value):
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    elif scaler:  # as GradScaler does on an overflow: back off the scale
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    opt.zero_grad(set_to_none=True)
    return loss_value, norm, int(n_read)


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """What the loop works with, made once by setup()."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    model: LaVIN
    ddp: torch.nn.Module  # the model, wrapped in DDP under torchrun
    tok: object
    ds: data.TokenizedDataset
    sampler: data.LengthGroupedBatchSampler
    opt: torch.optim.AdamW
    scaler: torch.amp.GradScaler | None
    accum: int  # micro-batches per optimizer step
    global_batch: int  # samples per optimizer step, all ranks
    lr: float
    steps_per_epoch: int
    stop: int  # the step to stop after
    out: Path
    step: int = 0  # optimizer steps done
    skipped: int = 0  # steps skipped for a NaN or inf loss
    nan_streak: int = 0  # of those, the ones in a row up to now

    def say(self, *args):
        if self.rank == 0:
            print(*args)


def main(cfg: TrainConfig, notes=()) -> dict:
    """Train (and evaluate) as cfg says; returns {"steps", "loss", "skipped", "eval", "model"}."""
    cfg = resolve(cfg)
    rank, world, device = setup_distributed(cfg.device, cfg.dist_timeout)
    compiled, compile_note = use_compile(cfg.compile, cfg.no_compile, device)  # on a GPU by default
    cfg = dataclasses.replace(cfg, compile=compiled)  # from here: what this run does
    threads_note = busy_cores_note(device, cfg.threads)  # the CPU threads of this process
    for note in [*notes, threads_note, compile_note] if rank == 0 else ():
        if note:
            print(f"note: {note}")
    if cfg.dry_run:
        dry_run(cfg, device)
        return {}
    run = setup(cfg, rank, world, device)
    try:
        loss = train_loop(run)
        return finish(run, loss)
    finally:
        drop_ddp(run)


def drop_ddp(run: Run):
    """Free the DDP wrapper now, while the interpreter is whole. The Run that holds it sits in a
    reference cycle that only the garbage collector frees; left to the last collection, at
    interpreter exit, a Gloo worker thread that then needs the GIL is ended by Python and the process
    aborts ("terminate called without an active exception", SIGABRT) after a finished run (a
    two-process DDP script did in 7 of 30 runs with torch 2.13 on the CPU). An exception on its way
    out holds the wrapper in its frames too (as sys.last_traceback keeps an uncaught one). Not the
    only cause: a rank still aborted so once in a whole suite, in none of 113 such runs outside it."""
    run.ddp = run.model
    e = sys.exc_info()[1]
    while e is not None:  # and the exceptions it was raised from (an OOM in DDP's forward, say)
        traceback.clear_frames(e.__traceback__)  # their locals only: the traceback still prints
        e = e.__cause__ or e.__context__


def setup(cfg: TrainConfig, rank: int, world: int, device: torch.device) -> Run:
    """Check the inputs, load the backbones and fresh adapters, the data, the optimizer; restore
    a checkpoint with --resume. Everything that can fail on bad input fails here."""
    if cfg.dataset in data.SYNTHETIC:  # generated on first use, by one process
        if rank == 0:
            data.ensure(cfg.dataset, cfg.data_path)
        if dist.is_initialized():
            dist.barrier()
    check_inputs(cfg)
    if not carries_on(cfg):  # else a used folder is this run's own
        check_output(cfg)
    ckpt, resume, resume_note = find_resume(cfg, asdict(lavin_args(cfg)))
    cfg = dataclasses.replace(cfg, resume=resume)  # from here: the checkpoint this run resumes from, or ""
    if ckpt is None and cfg.overwrite and rank == 0:  # the replaced run's: a restart must not resume from it
        Path(cfg.output_dir, CHECKPOINT).unlink(missing_ok=True)
    if cfg.accum_iter == 0 and cfg.effective_batch % (cfg.batch_size * world):
        raise UsageError(f"effective batch {cfg.effective_batch} is not a multiple of batch_size {cfg.batch_size} "
                         f"x {world} processes: set --accum_iter or --effective_batch")
    accum = cfg.accum_iter or cfg.effective_batch // (cfg.batch_size * world)
    global_batch = cfg.batch_size * accum * world
    dtype = pick_dtype(cfg.precision, device)
    model, tok = build_model(cfg, device, dtype)
    ds = data.build_dataset(cfg.dataset, cfg.data_path, "train", tok, prompt_format=cfg.prompt_format,
                            instruct_mode=cfg.instruct_mode, coco_root=cfg.coco_root, max_seq_len=cfg.max_seq_len,
                            reserve=model.n_inserted, image_mode=cfg.image_mode,
                            resolution=model.visual.resolution)
    if len(ds) and ds.n_no_target == len(ds):  # NaN losses, skipped steps, and nothing trained
        raise UsageError(f"--max_seq_len {cfg.max_seq_len} leaves no room for any answer: every one of the "
                         f"{len(ds)} samples of {ds.name} lost its whole target to the cut (the image's "
                         f"{model.n_inserted} inserted positions count too): raise it")
    n_bad = check_images(ds, cfg.skip_bad_images, rank, world)
    if n_bad and rank == 0:
        print(f"skipping {n_bad} samples whose image cannot be read")
    sampler = data.LengthGroupedBatchSampler(ds.lengths, cfg.batch_size, rank=rank, world_size=world,
                                             seed=cfg.seed, drop_last=True)  # the official loop drops it too
    steps_per_epoch = len(sampler) // accum  # a partial accumulation window at the epoch's end is dropped
    if steps_per_epoch == 0:
        raise UsageError(f"a step of batch_size {cfg.batch_size} x accum_iter {accum} x {world} processes = "
                         f"{global_batch} samples does not fit in the {len(ds)} samples of {ds.name}")
    total = steps_per_epoch * cfg.epochs
    lr = cfg.blr * global_batch / 256
    run = Run(cfg, rank, world, device, dtype, model, model, tok, ds, sampler,
              opt=make_optimizer(model, cfg, lr, device),
              scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
              accum=accum, global_batch=global_batch, lr=lr, steps_per_epoch=steps_per_epoch,
              stop=min(total, cfg.max_steps) if cfg.max_steps else total, out=Path(cfg.output_dir))
    if ckpt is not None:
        restore(run, ckpt, resume_note)
    else:
        if resume_note:
            run.say(resume_note)
        torch.manual_seed(cfg.seed + rank)  # dropout differs between ranks
    if world > 1:
        # Only the adapters train: the frozen weights are read from the same files by every rank,
        # so DDP neither broadcasts nor watches them.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
        run.ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lite = f" (LLaMA blocks' linear layers in {cfg.bits} bits)" if cfg.bits != 16 else ""
    where = f"cpu ({torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})" if device.type == "cpu" \
        else device.type
    run.say(f"{cfg.preset} on {cfg.dataset} ({len(ds)} samples): {n_train:,} trainable parameters, {world} "
            f"process(es) on {where} in {str(dtype).split('.')[-1]}{lite}, effective batch {global_batch} "
            f"({cfg.batch_size} x {accum} accum x {world}), lr {lr:.3g}, {steps_per_epoch} steps/epoch, "
            f"{run.stop} steps from {run.step}")
    return run


def build_model(cfg: TrainConfig, device, dtype) -> tuple[LaVIN, object]:
    """(LaVIN, tokenizer): frozen backbones in dtype, fresh fp32 adapters, the same on every rank."""
    torch.manual_seed(cfg.seed)
    try:
        model, tok = load_lavin(cfg.llama_path, cfg.clip_path, lavin_args(cfg), dtype=dtype, device=device,
                                max_seq_len=cfg.max_seq_len, bits=cfg.bits)
    except (OSError, KeyError, ValueError, TypeError) as e:  # weight files that do not fit their config
        raise UsageError(message(e)) from e
    model.llama.grad_checkpointing = model.visual.grad_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        compile_blocks(model)
    return model, tok


def train_loop(run: Run) -> float:
    """Optimizer steps from run.step to run.stop, a line of log.jsonl each, checkpoints at every
    epoch's end, every --save_interval steps and at the stop. Returns the last step's loss."""
    from tqdm import tqdm

    cfg, out = run.cfg, run.out
    log = open_log(out / LOG, run.step, resumed=bool(cfg.resume)) if run.rank == 0 else None
    bar = tqdm(total=run.stop, initial=run.step, desc="training", unit="step", disable=run.rank != 0,
               dynamic_ncols=True)
    run.model.train()
    with StopRequest() as stop:
        loss = epochs(run, log, bar, stop)
    bar.close()
    if log:
        log.close()
    if stop.asked:
        ckpt = run.out / "checkpoint.pth"
        command = "torchrun ... train.py" if run.world > 1 else f"python {' '.join(sys.argv) or 'train.py ...'}"
        raise Interrupted(f"interrupted: {ckpt} holds step {run.step} of {run.stop}; continue with  "
                          f"{command} --resume {ckpt}")
    return loss


def epochs(run: Run, log, bar, stop: StopRequest) -> float:
    """The steps of train_loop; returns after run.stop, or after the step in progress when a stop
    was asked for (the checkpoint then saved)."""
    cfg = run.cfg
    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if run.device.type == "cuda" else 0)
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)
    loss, compiled_once = float("nan"), False
    while run.step < run.stop:
        epoch, first = divmod(run.step, run.steps_per_epoch)
        run.sampler.set_epoch(epoch)
        # A generator of its own: making the iterator must not draw from the global RNG (dropout),
        # or a resumed run would diverge from the uninterrupted one.
        loader = DataLoader(run.ds, batch_sampler=data.SkipBatches(run.sampler, first * run.accum),
                            collate_fn=run.ds.collate, num_workers=workers, pin_memory=run.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batches = iter(loader)
        for i in range(first, min(run.steps_per_epoch, first + run.stop - run.step)):
            t0 = time.perf_counter()
            # set at the first micro-step of the window, from the fractional epoch, as the official loop
            lr = lr_at(epoch + i * run.accum / len(run.sampler), cfg, run.lr)
            for group in run.opt.param_groups:
                group["lr"] = lr
            micro = [next(batches) for _ in range(run.accum)]
            try:
                loss, grad_norm, n_read = train_step(run.ddp, micro, run.opt, run.scaler, autocast, run.device,
                                                     run.world)
            except torch.cuda.OutOfMemoryError:
                raise UsageError(f"batch_size {cfg.batch_size} does not fit in GPU memory (the longest batch comes "
                                 f"first): lower --batch_size (--accum_iter keeps the effective batch) or add "
                                 f"--grad_checkpointing") from None
            run.skipped += not math.isfinite(loss)
            run.nan_streak = 0 if math.isfinite(loss) else run.nan_streak + 1
            run.step += 1
            seconds = time.perf_counter() - t0
            rate = run.global_batch / seconds
            if cfg.compile and not compiled_once and run.rank == 0:
                bar.write(f"first step: {seconds:.0f} s, torch.compile compiling the blocks (the next batch "
                          f"of another length compiles once more; --no_compile runs eagerly)")
            compiled_once = True
            if log:
                row = {"step": run.step, "epoch": round(epoch + (i + 1) / run.steps_per_epoch, 4),
                       "loss": loss if math.isfinite(loss) else None, "lr": lr, "samples_per_s": round(rate, 2),
                       "tokens_per_s": round(n_read / seconds, 1),
                       "grad_norm": round(grad_norm, 6) if math.isfinite(grad_norm) else None}
                if run.device.type == "cuda":
                    row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
                log.write(json.dumps({**row, **({} if math.isfinite(loss) else {"skipped": True})}) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", refresh=False)
            bar.update()
            stopping = stop.agreed(run.world, run.device)
            if stopping or run.step == run.stop or i == run.steps_per_epoch - 1 or \
                    (cfg.save_interval and run.step % cfg.save_interval == 0):
                save_checkpoint(run)
                if run.rank == 0:
                    curves.draw_run(run.out)
            if stopping:
                return loss
    return loss


def evaluate_all(run: Run, found: list, evals: dict):
    """Each evaluation of config.evaluations into evals, by name: its files, a line in log.jsonl
    and, for a ScienceQA-format set, samples.png."""
    cfg, out = run.cfg, run.out
    for name, root, split, folder in found:
        task = data.evaluation(name, root, split, run.tok, prompt_format=cfg.prompt_format,
                               image_mode=cfg.image_mode, resolution=run.model.visual.resolution)
        evals[name] = evaluate_split(
            run.model, run.tok, task, output_dir=str(folder), batch_size=cfg.eval_batch_size, rank=run.rank,
            world_size=run.world, device=run.device, autocast_dtype=None if run.dtype == torch.float32 else run.dtype,
            compile=cfg.compile)
        if run.rank == 0:
            with open(out / LOG, "a") as log:
                log.write(json.dumps({"eval": evals[name]}) + "\n")
            if name in ("scienceqa", "shapes"):
                show_samples(task, cfg.eval_split, cfg.prompt_format, out)


def finish(run: Run, loss: float) -> dict:
    """The end of a run: the skipped-step warning, the evaluations (a line each in log.jsonl,
    results.json and the rest), samples.png and the next command to try."""
    cfg, out = run.cfg, run.out
    if run.skipped:
        run.say(f"warning: {run.skipped} step(s) had a NaN or inf loss and were skipped on every rank")
    result = {"steps": run.step, "loss": loss, "skipped": run.skipped, "eval": None, "model": run.model}
    found = [] if cfg.skip_eval else evaluations(cfg)
    if not cfg.skip_eval and not found:
        run.say(f"note: {cfg.data_path} holds no evaluation set (mme/, alpaca_{cfg.eval_split}.json); score the "
                f"chatbot with  python sample.py --run {out} --dataset mme --data_path <MME folder>")
    evals = {}
    try:
        evaluate_all(run, found, evals)
    except KeyboardInterrupt:  # the training is saved: say how to finish the rest, exactly
        rest = ["python sample.py --run " + " ".join([str(out), "--dataset", name, "--data_path", root]
                                                     + ["--split", split] * bool(split) + ["--output_dir", str(folder)])
                for name, root, split, folder in found if name not in evals]
        raise Interrupted(f"interrupted during the evaluation: the trained adapters are saved in {out / ADAPTERS}; "
                          f"finish it with  {'  and  '.join(rest)}") from None
    # a ScienceQA-format run's table; a chatbot's {"mme": ..., "alpaca": ...}
    result["eval"] = (evals or None) if cfg.dataset in data.CHAT_DATASETS else evals.get(data.EVAL_OF[cfg.dataset])
    if found and cfg.dataset in data.CHAT_DATASETS and run.rank == 0:
        print(f"talk to it:  python sample.py --run {out} --image <picture> --chat   (or in a browser: "
              f"python demo.py --run {out})")
    written = [str(folder / "results.json") for *_, folder in found if run.rank == 0]
    files = [str(out / name) for name in (LOG, CHECKPOINT, ADAPTERS, curves.CURVES)] + written
    run.say(f"wrote {', '.join(files)}")
    return result


if __name__ == "__main__":
    plain_warnings()
    try:
        cfg, notes = make_config()
        main(cfg, notes)
    except (UsageError, FileNotFoundError, data.scienceqa.DataError) as e:
        sys.exit(f"error: {e}")
    except RuntimeError as e:  # a rank died or hangs: one line each, then torchrun can restart the group
        if not (lost := peer_lost(e)):
            raise
        sys.exit(f"error: {lost}; the run goes on from its last checkpoint when torchrun restarts the group "
                 f"(--max_restarts N) or with --resume auto")
    except Interrupted as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank stopped, one says how to go on
            print(e, file=sys.stderr)
        sys.exit(130)  # as a shell reports a command stopped by SIGINT
    except KeyboardInterrupt:  # outside the loop (loading, evaluating), or a second Ctrl-C while saving
        print("\ninterrupted (checkpoint.pth, if any, is the last one completed)", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
