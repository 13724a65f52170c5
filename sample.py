"""Talking to a trained LaVIN: one image and a prompt, a terminal chat, or a dataset's evaluation.

    python sample.py --run out/shapes --image data/shapes/images/test/<pid>/image.png \\
        --prompt "Question: Which color is the shape?\\nContext: N/A\\nOptions: (A) red (B) blue\\nResponse:"
    python sample.py --llama_path weights/vicuna-7b --clip_path weights/ViT-L-14.pt --adapters a.pth --image cat.jpg
    python sample.py --run out/shapes                          # evaluate the run on its test split
    python sample.py --run out/shapes-chat --dataset mme --data_path MME_Benchmark_release_version
    torchrun --nproc_per_node 8 sample.py --dataset scienceqa --adapters checkpoint-19.pth \\
        --llama_path weights/7B --clip_path weights/ViT-L-14.pt

The generation itself is generate.py's, the evaluation loop evaluate.py's (it writes
preds.json, results.json and outputs.json and prints the table); this file is the command line.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data
from data.instruct import instruction_prompt
from data.scienceqa import DataError
from evaluate import evaluate_split
from generate import ContextTooLong, StaticDecoder, Stream, cache_dtype, decode, prefill_embeddings
from lavin import LaVIN, LaVINArgs, load_adapters, load_lavin, read_adapters
from model import KVCache
from quant import bits_of
from router import IMAGE, TEXT
from runtime import (UsageError, busy_cores_note, config_parser, message, pick_dtype, plain_warnings,
                     setup_distributed, use_compile)


@dataclass
class SampleConfig:
    # the weights
    run: str = ""  # a train.py output_dir: its adapters.pth, and every path below not given from its config;
    #                "" and no --llama_path/--clip_path: the newest run under out/
    llama_path: str = ""  # LLaMA folder (Meta's or Hugging Face's layout)
    clip_path: str = ""  # OpenAI CLIP checkpoint (ViT-L-14.pt), or a Hugging Face CLIP folder
    adapters: str = ""  # our adapters.pth or the official checkpoint-19.pth; "" = untrained (the plain backbones)
    # one prompt, or a chat
    image: str = ""  # an image file; "" = text only (the router takes the text path). Without --prompt: a chat
    #                  about it (a caption run captions it; a ScienceQA/shapes run reads its training format)
    prompt: str = ""  # the two characters \n become a newline
    chat: bool = False  # a conversation about --image in the terminal (also: --image without --prompt)
    template: str = "auto"  # raw: the prompt as typed | instruction: "Instruction: {prompt}\nResponse:"
    #                         auto: raw for a run trained on scienceqa/shapes, else instruction
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # sample from the smallest set of tokens whose probability reaches it
    seed: int = 0  # the sampling's random draws
    max_new_tokens: int = 64  # new tokens per answer at most
    fold: bool = True  # fold the one modality's routing into the weights (prompt, chat): plain LLaMA's cost
    # evaluation
    dataset: str = ""  # scienceqa | shapes | mme | alpaca (held-out text instructions) | coco; "" with --run: the run's
    split: str = "test"  # the split --dataset evaluates (alpaca: alpaca_{split}.json; MME has none)
    data_path: str = ""  # "" = the run's (a chat run's mme/ for mme), else data/{dataset}
    prompt_format: str = ""  # "" = the run's, else QCM-ALE
    output_dir: str = ""  # "" = {run}/eval-{split} (mme, alpaca: eval-{dataset}; -4bit etc. at other --bits than
    #                       the run's), else out/eval/{dataset}-{split} (mme, alpaca: out/eval/{dataset})
    batch_size: int = 16  # prompts per batch in an evaluation
    early_stop: bool = True  # end a row once its answer is read ("The answer is X.", MME's first word) or at EOS
    # the machine
    max_seq_len: int = 0  # 0 = the run's, else 512 (the official evaluation's)
    image_mode: str = ""  # lavin | clip (see clip.preprocess); "" = the run's, else lavin
    device: str = ""  # "" = cuda if there is one, else cpu
    threads: int = 0  # CPU threads for torch's ops; 0 = the run's, else OMP_NUM_THREADS or one per free core
    compile: bool = False  # decode steps of fixed shapes, torch.compile'd (on a GPU: an evaluation's default)
    no_compile: bool = False  # an evaluation on a GPU decodes eagerly too
    precision: str = "auto"  # auto (bf16, or fp16 without bf16, on GPU; fp32 on CPU) | bf16 | fp16 | fp32
    bits: int = 0  # LLaMA blocks' linear layers in 16 | 8 | 4 bits (NF4: LaVIN-lite); 0 = the run's, else 16


CHOICES = {"dataset": ("", *data.EVAL_DATASETS), "template": ("auto", "raw", "instruction"),
           "image_mode": ("", "lavin", "clip"), "precision": ("auto", "bf16", "fp16", "fp32"), "bits": (0, 16, 8, 4)}


# ----------------------------------------------------------------------------- the command line

def check_at_least(cfg, lows: dict):
    """Each named field at least its low; top_p in (0, 1]."""
    for name, low in lows.items():
        if getattr(cfg, name) < low:
            raise UsageError(f"--{name} must be at least {low}, got {getattr(cfg, name)}"
                             + (" (0 is greedy)" if name == "temperature" else ""))
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1], got {cfg.top_p}")


def make_config(argv=None) -> SampleConfig:
    argv = sys.argv[1:] if argv is None else argv
    shown = {k: tuple(v for v in values if v not in ("", 0)) for k, values in CHOICES.items()}  # "" / 0: the run's
    p = config_parser(SampleConfig, "Ask a trained LaVIN about an image, chat with it, or evaluate it.",
                      choices=CHOICES, shown=shown)
    cfg = SampleConfig(**vars(p.parse_args(argv)))
    if any(a == "--prompt" or a.startswith("--prompt=") for a in argv) and not cfg.prompt.strip():
        raise UsageError("--prompt is empty: type the question, or leave --prompt out to chat about --image")
    check_at_least(cfg, {"max_new_tokens": 1, "batch_size": 1, "temperature": 0, "threads": 0})
    return cfg


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


RUNS = "out"  # where train.py writes its runs by default


def newest_run(root=RUNS) -> str:
    """The train.py output_dir under root whose adapters.pth was written last; "" if none."""
    found = sorted(Path(root).glob("*/adapters.pth"), key=lambda p: p.stat().st_mtime)
    return str(found[-1].parent) if found else ""


def resolve(cfg: SampleConfig, runs=RUNS) -> tuple[SampleConfig, str]:
    """(the config with every default filled in, the mode: prompt | chat | eval). Without --run
    and without backbones, the newest run under `runs` (said in one line)."""
    trained_on, run = "", {}
    if not (cfg.run or cfg.llama_path or cfg.clip_path or cfg.adapters):
        cfg = dataclasses.replace(cfg, run=newest_run(runs))
        if not cfg.run:
            raise UsageError(f"no trained run under {runs}/ to talk to: train one with `python train.py --dataset "
                             f"shapes-chat` (minutes on a laptop), or give --run OUT")
        print(f"run: {cfg.run} (the newest under {runs}/; --run picks another)", file=sys.stderr)
    if cfg.run:
        path = Path(cfg.run) / "adapters.pth"
        if not path.is_file():
            raise UsageError(f"--run {cfg.run}: no adapters.pth there (a train.py --output_dir holds one)")
        run = read_checkpoint(path).get("config") or {}
        trained_on = run.get("dataset", "")
        cfg = dataclasses.replace(cfg, adapters=cfg.adapters or str(path))
    fill = {k: getattr(cfg, k) or run.get(k) or default for k, default in
            (("llama_path", ""), ("clip_path", ""), ("prompt_format", "QCM-ALE"), ("max_seq_len", 512),
             ("image_mode", "lavin"), ("bits", 16), ("threads", 0))}
    format_given, cfg = cfg.prompt_format, dataclasses.replace(cfg, **fill)
    if cfg.image and not cfg.prompt and not cfg.chat and trained_on in data.CAPTION_DATASETS:
        mode, cfg = "prompt", dataclasses.replace(cfg, prompt=data.coco.CAPTION_PROMPT, template="raw")  # caption it
    elif cfg.chat or (cfg.image and not cfg.prompt):
        mode = "chat"
    elif cfg.prompt:
        mode = "prompt"
    else:
        mode = "eval"
        chat_run = trained_on in data.CHAT_DATASETS
        dataset = cfg.dataset or data.EVAL_OF.get(trained_on, "")
        if not dataset:
            raise UsageError(f"nothing to do: give --prompt, --image (a chat) or --dataset "
                             f"{'|'.join(data.EVAL_DATASETS)}")
        own = ""  # the run's copy of this dataset
        if (dataset == data.EVAL_OF.get(trained_on) and not chat_run) or (chat_run and dataset == "alpaca"):
            own = run.get("data_path")
        elif chat_run and dataset == "mme" and run.get("data_path") and Path(run["data_path"], "mme").is_dir():
            own = f"{run['data_path']}/mme"
        where = dataset if dataset in ("mme", "alpaca") else cfg.split
        alone = f"out/eval/{dataset}" + (f"-{where}" if where != dataset else "")
        bits = f"-{cfg.bits}bit" if cfg.run and cfg.bits != run.get("bits", 16) else ""  # not the run's own table
        out = f"{cfg.run}/eval-{where}{bits}" if cfg.run else alone
        cfg = dataclasses.replace(cfg, dataset=dataset, output_dir=cfg.output_dir or out,
                                  data_path=cfg.data_path or own or data.DEFAULT_ROOTS[dataset])
    if cfg.dataset and mode != "eval":
        raise UsageError("--dataset evaluates: leave out --prompt, --image and --chat")
    if format_given and mode != "eval":
        print(f"note: --prompt_format {format_given} shapes the prompts of an evaluation (--dataset); a --prompt "
              f"or a chat is sent as typed (--template)", file=sys.stderr)
    if not cfg.llama_path or not cfg.clip_path:
        raise UsageError("give --llama_path and --clip_path, or --run OUT (a train.py output_dir)")
    if cfg.template == "auto":
        cfg = dataclasses.replace(cfg, template="raw" if trained_on in ("scienceqa", "shapes") else "instruction")
    return cfg, mode


def load_model(cfg: SampleConfig, device, dtype, ckpt: dict | None = None):
    """(model, tokenizer); ckpt: cfg.adapters' dict if the caller has read it already."""
    ckpt = read_checkpoint(cfg.adapters) if cfg.adapters and ckpt is None else ckpt
    try:
        model, tok = load_lavin(cfg.llama_path, cfg.clip_path, lavin_args(ckpt), dtype=dtype, device=device,
                                max_seq_len=cfg.max_seq_len, bits=cfg.bits)
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


def templated(template: str, text: str) -> str:
    """A user's text as the model reads it: as typed (raw) or in the instruction template."""
    return text if template == "raw" else instruction_prompt(text)


def typed_lines(read=input):
    """The user's turns: lines until an empty one, Ctrl-D or Ctrl-C (each ends the chat cleanly)."""
    while True:
        try:
            text = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print()  # the shell's prompt then starts a line of its own
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
    if cfg.fold and bits_of(model.llama) != 16:
        print(f"note: the adapters stay unfolded: they cannot be folded into the {bits_of(model.llama)}-bit weights "
              f"(--bits {bits_of(model.llama)})", file=sys.stderr)
    elif cfg.fold:
        model.fold(int(ind))
    decoder = StaticDecoder(model.llama) if cfg.compile else None  # after folding: it compiles what it sees
    cache = routes = None
    pending, answers = [], []  # pending: sampled but not yet fed (the last answer token, EOS)
    for text in turns:
        text = text.replace("\\n", "\n")
        prompt = templated(cfg.template, text)
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
    rank, world, device = setup_distributed(cfg.device)
    # On a GPU an evaluation compiles by default; a prompt or a chat would wait ~45 s for its first word
    compiled, compile_note = use_compile(cfg.compile, cfg.no_compile, device) if mode == "eval" or cfg.compile \
        else (False, "")
    cfg = dataclasses.replace(cfg, compile=compiled)  # from here: what this run does
    for note in (busy_cores_note(device, cfg.threads), compile_note):
        if note and rank == 0:
            print(f"note: {note}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg, device, pick_dtype(cfg.precision, device))
    image = read_image(cfg.image, model, cfg.image_mode).to(device) if cfg.image else None
    try:
        if mode == "eval":
            task = data.evaluation(cfg.dataset, cfg.data_path, cfg.split, tok, prompt_format=cfg.prompt_format,
                                   image_mode=cfg.image_mode, resolution=model.visual.resolution)
            return evaluate_split(model, tok, task, output_dir=cfg.output_dir, batch_size=cfg.batch_size,
                                  max_new_tokens=cfg.max_new_tokens, early_stop=cfg.early_stop, rank=rank,
                                  world_size=world, device=device, compile=cfg.compile)
        if mode == "chat":
            print("(an empty line, Ctrl-D or Ctrl-C ends the chat)")
            if cfg.template == "raw":  # a ScienceQA/shapes run: it knows no instructions, only its problems
                print(r"(this run answers its training format: Question: ...\nContext: ...\nOptions: (A) ... (B) ..."
                      r"\nResponse:  with \n typed as two characters)")
            try:
                return converse(model, tok, cfg, image, typed_lines(), prefix="lavin> ")
            except KeyboardInterrupt:  # while it answers: the chat ends as at an empty line
                print()
                return []
        return converse(model, tok, cfg, image, [cfg.prompt])[0]
    except ContextTooLong as e:
        raise UsageError(f"{e}: shorten the prompt, lower --max_new_tokens or raise --max_seq_len") from e


if __name__ == "__main__":
    plain_warnings()
    try:
        main(make_config())
    except (UsageError, FileNotFoundError, DataError) as e:
        sys.exit(f"error: {message(e)}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
