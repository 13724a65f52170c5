"""The settings of a training run: TrainConfig (every field a flag of train.py), the paper's
recipes as presets, and the checks that turn bad input into one line before any compute.

    defaults (TrainConfig) ─> the preset (by default the dataset's own) ─> the flags given
      └─ resolve(): empty paths filled in, values checked ─> check_inputs(): the files exist
      └─ evaluations(): what the run scores at its end;  dry_run(): --dry_run's summary
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import data
from lavin import LaVINArgs, build_architecture, llama_bytes, load_lavin, summary
from runtime import UsageError, config_parser


@dataclass
class TrainConfig:
    # what to train on
    dataset: str = "shapes"  # scienceqa | shapes | instruct | shapes-chat | coco | shapes-coco (shapes-*: laptop size)
    preset: str = ""  # lavin-7b | lavin-13b | lavin-{7b,13b}-lite | chatbot-7b | chatbot-13b | caption | shapes | shapes-chat | shapes-coco
    data_path: str = ""  # "" = data/{dataset}; the shapes folders also hold their tiny backbones
    coco_root: str = ""  # instruct: the folder of COCO_train2014_*.jpg; "" = {data_path}/train2014
    instruct_mode: str = "recipe"  # instruct: recipe (each question/answer pair alone, LaVIN's) | multiturn
    llama_path: str = ""  # LLaMA folder (Meta or Hugging Face layout); "" = the preset's default
    clip_path: str = ""  # OpenAI CLIP checkpoint, or a Hugging Face CLIP folder; "" = the preset's default
    output_dir: str = ""  # "" = out/{preset}, and -no_visual / -no_router / -4bit / -8bit for the variants
    # the recipe (the paper's, as the official scripts run it); presets set these
    epochs: int = 20  # passes over the training split
    batch_size: int = 4  # per process
    accum_iter: int = 0  # micro-batches per optimizer step; 0 = reach effective_batch
    effective_batch: int = 32  # batch_size x accum_iter x processes, when accum_iter is 0
    blr: float = 9e-3  # base lr: lr = blr * effective batch / 256
    warmup_epochs: float = 2.0  # linear warm-up, then half a cosine to 0 at the last epoch
    weight_decay: float = 0.02  # none on biases and 1-D parameters
    max_seq_len: int = 512  # positions per sample, inserted image tokens included; longer ones are cut
    prompt_format: str = "QCM-ALE"  # ScienceQA input-output format (data/scienceqa.py: 81 of them)
    adapter_dim: int = 8  # the adapters' bottleneck width
    temperature: float = 10.0  # router softmax temperature: 10 for 7B, 5 for 13B
    adapter_dropout: float = 0.1  # dropout after the adapters' down-projection
    image_mode: str = "lavin"  # lavin (224x224 resize, ImageNet mean/std: the released weights) | clip
    no_visual: bool = False  # ablation: no visual tokens, no CLIP adapters (image problems read "Image: N/A")
    no_router: bool = False  # ablation: one adapter path for both modalities instead of two and a router
    # the run
    seed: int = 0  # adapter initialisation, data order, dropout
    max_steps: int = 0  # stop after this many optimizer steps (counted from the start); 0 = all
    resume: str = ""  # a checkpoint.pth to continue from; auto: --output_dir's checkpoint.pth if it has one, else
    #  start there afresh (a requeued job reruns the same command; a torchrun restart does this by itself)
    overwrite: bool = False  # replace a run already in --output_dir instead of refusing to write there
    save_interval: int = 0  # optimizer steps between checkpoints; 0 = once per epoch
    dist_timeout: float = 10.0  # minutes a collective waits for a lost or hung process before the run stops
    num_workers: int = -1  # DataLoader workers per process; -1 = 4 on a GPU, 0 on the CPU
    device: str = ""  # "" = cuda if there is one, else cpu
    threads: int = 0  # CPU threads for torch's ops, fixed whatever the load; 0 = OMP_NUM_THREADS, else one
    #                   per core other work leaves free (a run's numbers can follow the count: the laptop presets take 1)
    precision: str = "auto"  # auto (bf16 where supported, else fp16 on GPU; fp32 on CPU) | bf16 | fp16 | fp32
    grad_checkpointing: bool = False  # recompute the frozen blocks in the backward pass
    bits: int = 16  # LLaMA blocks' linear layers: 16 (as --precision) | 8 (int8 per row) | 4 (NF4: LaVIN-lite)
    compile: bool = False  # torch.compile each transformer block, on the CPU too (on a GPU it is the default)
    no_compile: bool = False  # run eagerly on a GPU too (no torch.compile)
    skip_bad_images: bool = False  # drop samples whose image file is unreadable instead of stopping
    dry_run: bool = False  # build the model, print the parameter summary, stop
    skip_eval: bool = False  # no evaluation at the end
    eval_split: str = "test"  # the split evaluated at the end
    eval_batch_size: int = 16  # prompts per batch in that evaluation


WEIGHTS = {"7B": "weights/7B", "13B": "weights/13B", "vicuna-7b": "weights/vicuna-7b",
           "vicuna-13b": "weights/vicuna-13b", "llama3.1-8b": "weights/llama3.1-8b",
           "llama3.1-8b-instruct": "weights/llama3.1-8b-instruct", "mistral-7b": "weights/mistral-7b"}
CLIP = "weights/ViT-L-14.pt"


@dataclass(frozen=True)
class Preset:
    """A training recipe: the TrainConfig fields it sets (a flag given on the command line wins), and
    the lavin.ARCHITECTURES entry it trains (None: the tiny backbones that a laptop set brings)."""
    flags: dict
    architecture: str | None = None


PRESETS = {  # the paper's recipes, then the laptop ones
    "lavin-7b": Preset(dict(dataset="scienceqa", llama_path=WEIGHTS["7B"], clip_path=CLIP, temperature=10.0),
                       "lavin-7b"),
    "lavin-13b": Preset(dict(dataset="scienceqa", llama_path=WEIGHTS["13B"], clip_path=CLIP, temperature=5.0),
                        "lavin-13b"),
    # LaVIN-lite (the official --bits 4bit): NF4 LLaMA blocks, one GPU, batch 1 x 32 accumulation
    # with gradient checkpointing (a larger --batch_size keeps the effective 32 and runs faster)
    "lavin-7b-lite": Preset(dict(dataset="scienceqa", llama_path=WEIGHTS["7B"], clip_path=CLIP, temperature=10.0,
                                 bits=4, batch_size=1, grad_checkpointing=True), "lavin-7b"),
    "lavin-13b-lite": Preset(dict(dataset="scienceqa", llama_path=WEIGHTS["13B"], clip_path=CLIP, temperature=5.0,
                                  bits=4, batch_size=1, grad_checkpointing=True), "lavin-13b"),
    # LaVIN's chatbot: Vicuna, Alpaca-52k + LLaVA-Instruct, 15 epochs, 0.2 warm-up epochs
    "chatbot-7b": Preset(dict(dataset="instruct", llama_path=WEIGHTS["vicuna-7b"], clip_path=CLIP, epochs=15,
                              warmup_epochs=0.2, temperature=10.0), "lavin-7b"),
    # vl_instruction_tuning for 13B: 8 GPUs x batch 4 (the effective 32), temperature 5
    "chatbot-13b": Preset(dict(dataset="instruct", llama_path=WEIGHTS["vicuna-13b"], clip_path=CLIP, epochs=15,
                               warmup_epochs=0.2, temperature=5.0), "lavin-13b"),
    # Captions (ours: the paper gives no recipe): LLaMA-7B, one sample per reference caption of
    # train + restval (566k), 2 epochs, captions are short
    "caption": Preset(dict(dataset="coco", llama_path=WEIGHTS["7B"], clip_path=CLIP, epochs=2, warmup_epochs=0.2,
                           max_seq_len=128, temperature=10.0), "lavin-7b"),
    # The paper's recipes on today's backbones: LLaMA-3.1-8B (Meta's or Hugging Face's layout), Mistral-7B
    # (Hugging Face's), and the chatbot's on LLaMA-3.1-8B-Instruct (in the role Vicuna plays)
    "lavin-llama3-8b": Preset(dict(dataset="scienceqa", llama_path=WEIGHTS["llama3.1-8b"], clip_path=CLIP,
                                   temperature=10.0), "lavin-llama3-8b"),
    "lavin-mistral-7b": Preset(dict(dataset="scienceqa", llama_path=WEIGHTS["mistral-7b"], clip_path=CLIP,
                                    temperature=10.0), "lavin-mistral-7b"),
    "chatbot-llama3-8b": Preset(dict(dataset="instruct", llama_path=WEIGHTS["llama3.1-8b-instruct"], clip_path=CLIP,
                                     epochs=15, warmup_epochs=0.2, temperature=10.0), "lavin-llama3-8b"),
    # The laptop demo: tiny backbones inside data/shapes, the paper's recipe (lr, batch, warm-up
    # then cosine) on two CPU cores in minutes: 10 epochs of 3,588 problems, answer only (QCM-A:
    # the tiny LLaMA never read lectures). One CPU thread for every laptop preset: the same table
    # on a busy machine as on an idle one.
    "shapes": Preset(dict(dataset="shapes", batch_size=16, max_seq_len=256, prompt_format="QCM-A",
                          eval_batch_size=64, epochs=10, warmup_epochs=1.0, threads=1)),
    # The chatbot demo: the tiny Vicuna inside data/shapes-chat, the chatbot recipe's schedule
    # shortened to minutes on two CPU cores.
    "shapes-chat": Preset(dict(dataset="shapes-chat", batch_size=16, max_seq_len=256, eval_batch_size=64, epochs=4,
                               warmup_epochs=0.5, threads=1)),
    # The caption demo: the tiny Vicuna inside data/shapes-coco, 1,500 pictures x 5 captions
    "shapes-coco": Preset(dict(dataset="shapes-coco", batch_size=16, max_seq_len=128, eval_batch_size=64, epochs=3,
                               warmup_epochs=0.5, threads=1)),
}
DATASET_PRESET = {"scienceqa": "lavin-7b", "shapes": "shapes", "instruct": "chatbot-7b", "shapes-chat": "shapes-chat",
                  "coco": "caption", "shapes-coco": "shapes-coco"}

CHOICES = {"dataset": tuple(DATASET_PRESET), "preset": tuple(PRESETS), "bits": (16, 8, 4),
           "precision": ("auto", "bf16", "fp16", "fp32"), "instruct_mode": data.instruct.MODES,
           "image_mode": ("lavin", "clip")}


def make_config(argv=None) -> tuple[TrainConfig, list[str]]:
    """TrainConfig from the command line: the dataclass defaults, then the preset (by default the
    dataset's own), then the flags given. Returns the config and notes on flags that overrode it."""
    in_a_preset = {k for recipe in PRESETS.values() for k in recipe.flags}
    p = config_parser(TrainConfig, "Mixture-of-Modality Training of LaVIN.", shown=CHOICES,  # checked by resolve()
                      default_text=lambda f: f"the preset's, else {f.default!r}" if f.name in in_a_preset
                      else repr(f.default))
    given = vars(p.parse_args(argv))  # only the flags on the command line
    preset = preset_of(given.get("dataset", TrainConfig.dataset), given.get("preset", ""))
    # the weights' paths stay "" here: resolve() fills them, from a shapes set's own backbones first
    recipe = {k: v for k, v in PRESETS[preset].flags.items() if k not in ("llama_path", "clip_path")}
    values = {**recipe, "preset": preset}
    notes = [f"--{k} {v} overrides preset {preset}'s {k}={values[k]}" for k, v in given.items()
             if k in values and values[k] != v]
    return TrainConfig(**{**values, **given}), notes


def preset_of(dataset: str, preset: str) -> str:
    """The preset a run uses (by default the dataset's own), after checking both names."""
    if dataset not in DATASET_PRESET:
        raise UsageError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASET_PRESET)}")
    if preset and preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return preset or DATASET_PRESET[dataset]


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the paths left empty with their defaults, and check the values."""
    preset = preset_of(cfg.dataset, cfg.preset)
    data_path = cfg.data_path or data.DEFAULT_ROOTS[cfg.dataset]
    tiny = {"shapes": "llama", "shapes-chat": "vicuna", "shapes-coco": "vicuna"}.get(cfg.dataset)  # in the set
    if tiny is None:  # a shapes set read as its real format (--dataset coco --data_path data/shapes-coco)
        tiny = next((d for d in ("llama", "vicuna") if Path(data_path, d, "params.json").is_file()), None)
    # never over the full run: ablations and other bits than the preset's get folders of their own
    ablation = "-no_visual" * cfg.no_visual + "-no_router" * cfg.no_router
    recipe = PRESETS[preset].flags
    ablation += f"-{cfg.bits}bit" * (cfg.bits != recipe.get("bits", 16))
    cfg = dataclasses.replace(
        cfg, preset=preset, data_path=data_path, output_dir=cfg.output_dir or f"out/{preset}{ablation}",
        llama_path=cfg.llama_path or (f"{data_path}/{tiny}" if tiny else recipe.get("llama_path", "")),
        clip_path=cfg.clip_path or (f"{data_path}/clip/ViT-tiny.pt" if tiny else recipe.get("clip_path", "")),
        coco_root=cfg.coco_root or (f"{data_path}/train2014" if cfg.dataset in data.CHAT_DATASETS else ""))
    if cfg.threads < 0:
        raise UsageError(f"--threads must be at least 0 (0 = OMP_NUM_THREADS, else one per free core), "
                         f"got {cfg.threads}")
    for name in ("epochs", "batch_size", "effective_batch", "max_seq_len", "adapter_dim", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("accum_iter", "max_steps", "save_interval"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name} must be at least 0, got {getattr(cfg, name)}")
    for name in ("blr", "temperature", "dist_timeout"):  # nan and inf pass a plain `> 0`, then train nothing
        if not math.isfinite(getattr(cfg, name)) or getattr(cfg, name) <= 0:
            raise UsageError(f"--{name} must be a finite number above 0, got {getattr(cfg, name)}")
    if cfg.bits not in (16, 8, 4):
        raise UsageError(f"--bits {cfg.bits}: use 16, 8 or 4 (NF4, LaVIN-lite)")
    if cfg.instruct_mode not in data.instruct.MODES:
        raise UsageError(f"unknown --instruct_mode {cfg.instruct_mode!r}: use one of {', '.join(data.instruct.MODES)}")
    if cfg.precision not in CHOICES["precision"]:
        raise UsageError(f"unknown precision {cfg.precision!r}: use auto, bf16, fp16 or fp32")
    if cfg.image_mode not in CHOICES["image_mode"]:
        raise UsageError(f"unknown --image_mode {cfg.image_mode!r}: use lavin or clip")
    if not 0 <= cfg.adapter_dropout < 1 or not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise UsageError("--adapter_dropout must be in [0, 1), --warmup_epochs in [0, epochs]")
    try:
        data.scienceqa.check_format(cfg.prompt_format)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg


def check_inputs(cfg: TrainConfig):
    """Every file the run needs, before any compute: a missing one says what was expected."""
    llama = Path(cfg.llama_path)
    if not (llama / "params.json").is_file() and not (llama / "config.json").is_file():
        raise UsageError(
            f"no LLaMA weights in {llama}: expected Meta's layout (params.json, consolidated.00.pth, ..., "
            f"tokenizer.model in the folder or its parent) or Hugging Face's (config.json, *.safetensors or "
            f"pytorch_model*.bin, tokenizer.model or LLaMA-3's tokenizer.json); request them from Meta (or "
            f"Vicuna's, Mistral's from Hugging Face) and pass --llama_path")
    if not is_clip(cfg.clip_path):
        raise UsageError(f"no CLIP checkpoint at {cfg.clip_path}: expected OpenAI's ViT-L-14.pt (the file "
                         f"the openai/CLIP package downloads for 'ViT-L/14') or Hugging Face's folder of "
                         f"openai/clip-vit-large-patch14 (config.json, model.safetensors); pass --clip_path")
    root = Path(cfg.data_path)
    if cfg.dataset == "scienceqa" and not (root / "problems.json").is_file():
        raise UsageError(f"no ScienceQA release in {root}: expected problems.json, pid_splits.json and "
                         f"images/{{train,val,test}}/<pid>/image.png from the ScienceQA repository's data "
                         f"download; pass --data_path")
    if cfg.dataset == "instruct" and not (root / data.instruct.ALPACA).is_file():
        raise UsageError(f"no instruction data in {root}: expected {data.instruct.ALPACA} (Alpaca) and "
                         f"{', '.join(data.instruct.LLAVA)} (LLaVA-Instruct); pass --data_path")
    if cfg.dataset == "coco" and not (root / "dataset_coco.json").is_file():
        raise UsageError(f"no Karpathy split in {root}: expected dataset_coco.json and the train2014/, val2014/ "
                         f"pictures of COCO 2014; pass --data_path")
    if cfg.dataset in data.CHAT_DATASETS and not Path(cfg.coco_root).is_dir():
        raise UsageError(f"no COCO train2014 folder at {cfg.coco_root}: LLaVA-Instruct's pictures are COCO's "
                         f"(COCO_train2014_*.jpg from cocodataset.org); pass --coco_root")


def is_clip(path: str) -> bool:
    """OpenAI's archive is a file, Hugging Face's layout a folder with config.json."""
    return Path(path).is_file() or Path(path, "config.json").is_file()


def evaluations(cfg: TrainConfig) -> list[tuple[str, str, str, Path]]:
    """(dataset, root, split, output folder) of each evaluation at the end of a run: the test split
    of a ScienceQA-format or caption set; for the chatbot, the MME set and the held-out text instructions
    that its data folder holds (the shapes-chat set has both)."""
    out = Path(cfg.output_dir)
    if cfg.dataset not in data.CHAT_DATASETS:
        return [(data.EVAL_OF[cfg.dataset], cfg.data_path, cfg.eval_split, out)]
    found = [("mme", f"{cfg.data_path}/mme", "", out / "eval-mme")] if Path(cfg.data_path, "mme").is_dir() else []
    if Path(cfg.data_path, f"alpaca_{cfg.eval_split}.json").is_file():
        found.append(("alpaca", cfg.data_path, cfg.eval_split, out / "eval-alpaca"))
    return found


def lavin_args(cfg: TrainConfig) -> LaVINArgs:
    return LaVINArgs(adapter_dim=cfg.adapter_dim, temperature=cfg.temperature, adapter_dropout=cfg.adapter_dropout,
                     visual=not cfg.no_visual, router=not cfg.no_router)


def check_output(cfg: TrainConfig):
    """A second run into a folder that holds one would append to its log and write over its
    checkpoint: refuse, naming the ways forward."""
    out = Path(cfg.output_dir)
    held = [name for name in ("log.jsonl", "checkpoint.pth") if (out / name).exists()]
    if held and not cfg.resume and not cfg.overwrite:
        raise UsageError(f"{out} already holds a run ({', '.join(held)}): continue it with --resume "
                         f"{out / 'checkpoint.pth'}, or write to a new --output_dir (--overwrite replaces it)")


def dry_run(cfg: TrainConfig, device: torch.device):
    """The parameter summary and the frozen LLaMA's bytes at 16, 8 and 4 bits: from the weights
    when they are there, else from the preset's config on the meta device (no memory, no files)."""
    if Path(cfg.llama_path).is_dir() and is_clip(cfg.clip_path):
        model, _ = load_lavin(cfg.llama_path, cfg.clip_path, lavin_args(cfg), device=device, dtype=torch.float32,
                              max_seq_len=cfg.max_seq_len, bits=cfg.bits)
        where = f"from {cfg.llama_path} and {cfg.clip_path}"
    elif (architecture := PRESETS[cfg.preset].architecture) is not None:
        model = build_architecture(architecture, args=lavin_args(cfg))
        where = f"{architecture}'s LLaMA and ViT-L/14 configs on the meta device (no weights read)"
    else:
        raise UsageError(f"--dry_run needs the weights ({cfg.llama_path}, {cfg.clip_path}) for preset {cfg.preset}")
    print(f"{cfg.preset}: {where}\n{summary(model)}")
    for bits in (16, 8, 4):  # bf16/fp16 embeddings, norms and output head; the blocks' linears at `bits`
        n = llama_bytes(model.llama.args, bits)
        size = f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"
        print(f"{f'frozen LLaMA at {bits} bits':<32}{n:>16,} bytes ({size})"
              + ("  <- this run (--bits)" if bits == cfg.bits else ""))
    return model
