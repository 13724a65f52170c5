"""A training run's files and how a run carries on from them: checkpoint.pth (what a resume reads),
adapters.pth (what sample.py reads) and log.jsonl (a line per step).

Where a run resumes from:
    --resume PATH       that checkpoint, checked against this run's settings
    --resume auto       the output folder's checkpoint.pth if it holds one, else a fresh start there
                        (a requeued job runs the same command again and carries on)
    torchrun restarts   (--max_restarts; TORCHELASTIC_RESTART_COUNT > 0) as --resume auto: the
                        restarted group carries on from the last checkpoint by itself
A resume is exact: adapters, optimizer, scaler, step and every rank's RNG state come back, and
log.jsonl drops the lines logged past the checkpoint's step (those steps run again).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from adapter import load_trainable, trainable_state_dict
from lavin import atomic_save, save_adapters
from runtime import UsageError, restart_count

CHECKPOINT, ADAPTERS, LOG = "checkpoint.pth", "adapters.pth", "log.jsonl"


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def unusable(run) -> str:
    """Why the adapters at run.step must not be saved over the last checkpoint, or "": a NaN or inf
    loss at every step for an epoch or more, or at every step of a run that ends now (a skipped
    step changes nothing, so such a run never recovers; a lone skipped step, a batch whose answers
    the cut removed, is no reason), or adapters that are no longer finite."""
    last = run.out / CHECKPOINT
    kept = f"{last} is the last good checkpoint" if last.exists() else "no checkpoint was written"
    streak = run.nan_streak
    if streak and (streak >= run.steps_per_epoch or (streak == run.step and run.step == run.stop)):
        return (f"the loss was NaN or inf at every step since step {run.step - streak} ({streak} steps), and a "
                f"skipped step changes nothing: the run would not recover ({kept}); lower --blr (it is "
                f"{run.cfg.blr}), check --precision and that the answers fit --max_seq_len")
    params = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
    if not torch.stack([torch.isfinite(p).all() for _, p in params]).all():  # one host sync
        name = next(n for n, p in params if not torch.isfinite(p).all())
        return (f"the adapters are no longer finite at step {run.step} ({name} holds NaN or inf; {kept}): "
                f"lower --blr (it is {run.cfg.blr}) or use --precision bf16")
    return ""


def save_checkpoint(run):
    """checkpoint.pth and adapters.pth of train.Run `run`. Every rank calls this: the RNG states
    of all ranks go into the file, written by rank 0. A file that cannot be written (a full disk,
    a folder that vanished) leaves the previous one whole, and every rank stops with one line.
    So do adapters that are no use: nothing would look more like a finished run."""
    why = unusable(run)
    if why:  # the same on every rank: the adapters are replicas, the loss all-reduced
        raise UsageError(why)
    rngs = [rng_state(run.device)]
    if dist.is_initialized():
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_state(run.device))
    error = ""
    if run.rank == 0:
        model, cfg = run.model, asdict(run.cfg)
        state = {"model": {k: v.detach().float().cpu() for k, v in trainable_state_dict(model).items()},
                 "optimizer": run.opt.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
                 "step": run.step, "rng": rngs, "world_size": run.world, "config": cfg,
                 "lavin_args": asdict(model.args), "llama_args": asdict(model.llama.args),
                 "global_batch": run.global_batch, "steps_per_epoch": run.steps_per_epoch, "skipped": run.skipped,
                 "nan_streak": run.nan_streak}
        path = run.out / CHECKPOINT
        try:
            atomic_save(state, path)
            path = run.out / ADAPTERS
            save_adapters(path, model, config=cfg, step=run.step)
        except OSError as e:
            error = (f"cannot write {path} at step {run.step}: {e.strerror or e}; the last checkpoint written "
                     f"before it is whole: make room and run the same command with --resume auto")
    if dist.is_initialized():  # the other ranks learn whether rank 0 could write, and stop with it
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UsageError(error)


def carries_on(cfg) -> bool:
    """Whether the run goes on from its output folder's own checkpoint, if any: --resume auto, or
    a group that torchrun restarted (then a used folder is this run's, not one to refuse)."""
    return cfg.resume == "auto" or restart_count() > 0


def find_resume(cfg, lavin_args: dict) -> tuple[dict | None, str, str]:
    """(the checkpoint to resume from or None, its path, the line that says where the run starts):
    --resume PATH; or, with --resume auto or in a group that torchrun restarted, the output
    folder's checkpoint.pth when there is one (refused when it is another run's) and a fresh
    start when there is none."""
    if not carries_on(cfg):
        return (read_resume(cfg.resume, cfg, lavin_args), cfg.resume, "") if cfg.resume else (None, "", "")
    if cfg.resume == "auto" and cfg.overwrite:
        raise UsageError("--resume auto continues the run in --output_dir, --overwrite replaces it: give one")
    attempt = restart_count()
    who = f"restarted by torchrun (attempt {attempt})" if attempt else "--resume auto"
    path = Path(cfg.output_dir) / CHECKPOINT
    if not path.is_file():
        if cfg.resume not in ("", "auto"):  # restarted before its first checkpoint: from the one it was given
            ckpt = read_resume(cfg.resume, cfg, lavin_args)
            return ckpt, cfg.resume, f"{who}: resuming from {cfg.resume} at step {ckpt['step']}"
        return None, "", f"{who}: no checkpoint in {cfg.output_dir} yet, starting from step 0"
    try:
        ckpt = read_resume(str(path), cfg, lavin_args)
    except UsageError as e:
        raise UsageError(f"{cfg.output_dir} already holds another run ({e}): write to a new --output_dir "
                         f"(--overwrite replaces it)") from None
    return ckpt, str(path), f"{who}: resuming from {path} at step {ckpt['step']}"


def read_resume(path: str, cfg, lavin_args: dict) -> dict:
    """The checkpoint at path, checked against this run's model settings (cfg, a TrainConfig, and
    its LaVINArgs as a dict)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step", "config", "lavin_args"} <= set(ckpt):
        raise UsageError(f"--resume {path}: not a train.py checkpoint (adapters.pth only holds weights: "
                         f"resume from checkpoint.pth)")
    for key, theirs in ckpt["lavin_args"].items():
        if key != "adapter_dropout" and lavin_args.get(key) != theirs:
            raise UsageError(f"--resume {path} was trained with {key}={theirs}, this run has {key}="
                             f"{lavin_args.get(key)} (preset {ckpt['config'].get('preset')} vs {cfg.preset})")
    for key, before in (("dataset", None), ("epochs", None), ("bits", 16)):  # bits: 16 before LaVIN-lite
        if ckpt["config"].get(key, before) != getattr(cfg, key):
            raise UsageError(f"--resume {path} comes from a run with {key}={ckpt['config'].get(key, before)}, "
                             f"this run has {key}={getattr(cfg, key)}")
    return ckpt


def restore(run, ckpt: dict, note: str = ""):
    """Continue train.Run `run` where the checkpoint stopped: adapters, optimizer, scaler, step and
    RNG states."""
    cfg = run.cfg
    if ckpt.get("global_batch") != run.global_batch or ckpt.get("steps_per_epoch") != run.steps_per_epoch:
        raise UsageError(f"--resume {cfg.resume}: its run had {ckpt.get('global_batch')} samples per step and "
                         f"{ckpt.get('steps_per_epoch')} steps per epoch, this one {run.global_batch} and "
                         f"{run.steps_per_epoch}: resume with the same batch settings")
    try:
        load_trainable(run.model, ckpt["model"], source=cfg.resume)
    except (KeyError, ValueError) as e:
        raise UsageError(f"--resume: {e}") from None
    run.opt.load_state_dict(ckpt["optimizer"])
    if run.scaler is not None and ckpt["scaler"]:
        run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.skipped, run.nan_streak = ckpt["step"], ckpt.get("skipped", 0), ckpt.get("nan_streak", 0)
    rng = ckpt["rng"][run.rank] if ckpt["world_size"] == run.world else ckpt["rng"][0]
    torch.set_rng_state(rng["torch"])
    if run.device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    run.say(note or f"resumed from {cfg.resume} at step {run.step}")


def open_log(path: Path, step: int, resumed: bool):
    """log.jsonl, a line per step: new, or for a resumed run the lines up to its checkpoint's step
    (the steps logged after it, before a crash, run again and are logged again)."""
    if resumed and path.is_file():
        kept = [row for row in path.read_text().splitlines() if (logged_step(row) or step + 1) <= step]
        path.write_text("".join(row + "\n" for row in kept))
    return open(path, "a" if resumed else "w")


def logged_step(row: str) -> int | None:
    """The step of a log.jsonl line; None for an evaluation's line or one cut short by a kill."""
    try:
        return json.loads(row).get("step")
    except ValueError:
        return None
