"""The tiny pre-trained backbones of the `shapes` demo, in the official formats.

LaVIN starts from a LLaMA that has read the web and a CLIP that has seen 400M captioned images.
The demo cannot download those, so this module makes stand-ins in minutes, and the repository
ships its output (data/shapes_backbones, 2.5 MB) so a first run does not wait for it:

    problem texts of every family ──sentencepiece BPE──> tokenizer.model (800 pieces)
    a fresh seeded stream of problems ──AdamW──> llama/params.json, consolidated.00.pth (bf16)
        text problems:  [BOS] "Image: N/A" question, context, options -> "The answer is X."
        image problems: [BOS] "Image: A red circle." question, options -> "The answer is X."
    random scenes ──AdamW, attribute classification──> clip/ViT-tiny.pt (fp16, `visual.` keys)
    llama/ + instructions ──AdamW, all weights──> vicuna/ (bf16): the chatbot's backbone, as
        Vicuna is a LLaMA instruction-tuned (data/shapes_chat.py's questions, "Instruction: ...
        \nResponse:", a picture read as its caption; a third text-only, some conversations)

The LLaMA reads *descriptions* of pictures (as a real one has read alt texts and captions) but has
never seen a picture: given LaVIN's "Image: N/A" it is at chance on image problems, and only
the visual tokens, the neck and the adapters can close that gap. backbones.json records how well
each backbone learnt. Seeded, on one thread: the same seed gives the same bytes on one kind of
CPU (float sums may differ across instruction sets).

    python -m data.backbones --out DIR [--seed 0]     about 25 minutes (one thread)
    python -m data.backbones --out DIR --add-vicuna   only vicuna/, from DIR's llama/ (15 minutes)
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from data import shapes

# The letter binding (find the option that matches, say its letter) appears late, after ~1000 steps.
LM_DIM, LM_LAYERS, LM_HEADS, LM_LR, LM_BATCH, LM_STEPS, ANSWER_WEIGHT = 96, 4, 8, 2e-3, 32, 2500, 5.0
VICUNA_STEPS = 1000  # instruction tuning, batches of LM_BATCH
CLIP_WIDTH, CLIP_LAYERS, CLIP_PATCH, CLIP_LR, CLIP_BATCH, CLIP_STEPS = 64, 12, 16, 1e-3, 64, 2000


def progress(it, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(it, desc=desc, disable=quiet, leave=False, mininterval=1.0)


# ----------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list, path: Path, vocab_size: int = 800) -> None:
    """LLaMA-style sentencepiece BPE: unk 0, BOS 1, EOS 2, no pad, bytes for anything unseen."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        # identity + kept spaces, as Meta's: decode(encode(s)) == s, newlines included
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        # The option letters are pieces of their own, so "(A)" and "The answer is A." share the
        # token A: a tiny model then finds the letter by copying (Meta's has "▁A" vs "A", and a
        # 7B model learnt that mapping from far more text than we have minutes for).
        user_defined_symbols=list(shapes.LETTERS), num_threads=1, minloglevel=2)  # 1 thread: same merges
    path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------- tiny LLaMA

def lm_corpus(n: int, seed: int) -> list:
    """The tiny LLaMA's 'web text': n (problem, caption) pairs from a fresh seeded stream of every
    family, disjoint in seed from the set itself. Image problems come with their caption."""
    rng = random.Random(seed + 7919)
    return [shapes.make_problem(rng, shapes.FAMILIES[i % len(shapes.FAMILIES)], rng.randint(1, 12))[::2]
            for i in range(n)]


def lm_tokens(tok, problem: dict, caption: str | None) -> tuple[list, int]:
    """The sequence LaVIN feeds the LLaMA, with the picture's caption in place of the visual
    tokens: [BOS] "Image: " caption | "Image: N/A", prompt, "The answer is X." EOS; and where the
    answer's tokens start. Pre-training stops after the letter (QCM-A, the shapes recipe)."""
    prompt, target = shapes.problem_text(problem)
    ids = tok.encode(prompt + target.split(" BECAUSE:")[0], bos=True, eos=True)  # as data/ encodes
    image = tok.encode("Image: ", bos=False, eos=False) + tok.encode(caption, bos=False, eos=False) \
        if caption else tok.encode("Image: N/A", bos=False, eos=False)  # as lavin.py inserts them
    start = len(tok.encode(prompt + "The answer is", bos=True, eos=False)) + len(image)
    return [ids[0], *image, *ids[1:]], start


def lm_batch(batch: list):
    """Right-padded (tokens, next-token targets, loss weights) for (ids, answer start) pairs."""
    T = max(len(ids) for ids, _ in batch) - 1
    tokens = torch.zeros(len(batch), T, dtype=torch.long)  # 0 (unk) pads; its weight is 0
    targets, weights = torch.zeros_like(tokens), torch.zeros(len(batch), T)
    for b, (ids, start) in enumerate(batch):
        n = len(ids) - 1
        tokens[b, :n], targets[b, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        weights[b, :n] = 1.0  # all text is language to model; copying names from the hint helps
        weights[b, start - 1:n] = ANSWER_WEIGHT  # the targets " X." EOS: the point of it all
    return tokens, targets, weights


def pretrain_llama(tok, corpus: list, steps: int, seed: int, quiet: bool):
    """A small Llama trained with AdamW on the corpus, one pass (every step sees new problems)."""
    from model import Llama, ModelArgs

    # More heads than the width needs: more chances that one of them learns the binding early.
    args = ModelArgs(dim=LM_DIM, n_layers=LM_LAYERS, n_heads=LM_HEADS, n_kv_heads=LM_HEADS,
                     vocab_size=tok.n_words, multiple_of=32, norm_eps=1e-5, max_seq_len=512)
    data = [lm_tokens(tok, *pc) for pc in corpus]
    with torch.random.fork_rng():  # seed locally: the caller's random stream stays as it was
        torch.manual_seed(seed)
        model = Llama(args)
        fit(model, lambda step: lm_batch(data[step * LM_BATCH:(step + 1) * LM_BATCH]), steps,
            "pre-training the tiny LLaMA", quiet)
    return model.eval()


def fit(model, batch_at, steps: int, desc: str, quiet: bool) -> None:
    """AdamW on the weighted next-token loss of batch_at(step) -> (tokens, targets, weights)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, betas=(0.9, 0.95), weight_decay=0.0)
    for step in progress(range(steps), desc, quiet):
        tokens, targets, weights = batch_at(step)
        for g in opt.param_groups:  # warm-up, hold (the binding is learnt late), decay to a tenth
            g["lr"] = LM_LR * min((step + 1) / 30, 1.0, 0.1 + 0.9 * (steps - step) / (0.2 * steps))
        loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), reduction="none")
        loss = (loss * weights.flatten()).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def save_llama(model, folder: Path) -> None:
    """Meta's layout: params.json (vocab_size -1: from the tokenizer) and one bf16 shard."""
    folder.mkdir(parents=True)
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
            "norm_eps", "rope_theta")
    params = {**{k: getattr(model.args, k) for k in keys}, "vocab_size": -1}
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
               folder / "consolidated.00.pth")


@torch.no_grad()
def answer_accuracy(model, tok, pairs: list) -> float:
    """Share of (problem, caption or None) answered right: greedy decoding of three tokens after
    "The answer is", read with the evaluation's own pattern."""
    from data.table import parse_answer

    right = 0
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        seqs = [lm_tokens(tok, p, c) for p, c in chunk]
        lengths = torch.tensor([start for _, start in seqs])
        tokens = torch.zeros(len(seqs), int(lengths.max()) + 3, dtype=torch.long)  # right-padded:
        for b, (ids, start) in enumerate(seqs):  # harmless, as each row reads its own real positions
            tokens[b, :start] = torch.tensor(ids[:start])
        rows = torch.arange(len(seqs))
        for _ in range(3):
            tokens[rows, lengths] = model(tokens)[rows, lengths - 1].argmax(-1)
            lengths += 1
        for b, (p, _) in enumerate(chunk):  # decode it all: sentencepiece drops a leading space
            text = tok.decode(tokens[b, :lengths[b]].tolist())
            right += parse_answer(text[text.rindex("The answer is"):], len(p["choices"])) == p["answer"]
    return round(right / max(1, len(pairs)), 4)


# ----------------------------------------------------------------------------- tiny Vicuna

def chat_corpus(n: int, seed: int) -> list:
    """n (caption or None, [(prompt, answer), ...]) in the chatbot's instruction template: a third
    text-only instructions, the rest questions about a picture (read as its caption), a third of
    those conversations of two or three turns."""
    from data import shapes_chat
    from data.instruct import alpaca_turn, instruction_prompt

    rng = random.Random(seed + 15485863)
    corpus = []
    for i in range(n):
        if i % 3 == 0:
            corpus.append((None, [alpaca_turn(shapes_chat.text_instruction(rng))]))
            continue
        _, f = shapes_chat.picture(rng)
        asks = [(rng.choice(shapes_chat.DESCRIBE), shapes_chat.caption(f))] if rng.random() < 0.2 else []
        while len(asks) < (rng.randint(2, 3) if i % 3 == 2 else 1):
            asks.append(shapes_chat.any_question(rng, f))
        corpus.append((shapes_chat.caption(f), [(instruction_prompt(q), a) for q, a in asks]))
    return corpus


def chat_tokens(tok, caption: str | None, turns: list) -> tuple[list, list]:
    """(ids, is_answer) as the chatbot's data is tokenised (data/batching.encode_turns), with the
    caption where LaVIN puts the visual tokens."""
    from data.batching import IGNORE_INDEX, encode_turns

    ids, labels, _ = encode_turns(tok, turns)
    image = tok.encode("Image: ", bos=False, eos=False) + tok.encode(caption, bos=False, eos=False) \
        if caption else tok.encode("Image: N/A", bos=False, eos=False)
    answer = [x != IGNORE_INDEX for x in labels]
    return [ids[0], *image, *ids[1:]], [False, *[False] * len(image), *answer[1:]]


def chat_batch(batch: list):
    """Right-padded (tokens, targets, weights) for (ids, is_answer) pairs: the answers weigh more."""
    T = max(len(ids) for ids, _ in batch) - 1
    tokens = torch.zeros(len(batch), T, dtype=torch.long)
    targets, weights = torch.zeros_like(tokens), torch.zeros(len(batch), T)
    for b, (ids, answer) in enumerate(batch):
        n = len(ids) - 1
        tokens[b, :n], targets[b, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        weights[b, :n] = 1.0 + (ANSWER_WEIGHT - 1.0) * torch.tensor(answer[1:], dtype=torch.float)
    return tokens, targets, weights


@torch.no_grad()
def chat_accuracy(model, tok, items: list, new_tokens: int = 16) -> float:
    """Share of (caption or None, prompt, answer) whose greedy answer matches (instruct.normalise)."""
    from data.instruct import normalise

    right = 0
    for i in range(0, len(items), 64):
        chunk = items[i:i + 64]
        seqs = [chat_tokens(tok, c, [(p, "")])[0][:-1] for c, p, _ in chunk]  # without the EOS
        lengths = torch.tensor([len(s) for s in seqs])
        tokens = torch.zeros(len(seqs), int(lengths.max()) + new_tokens, dtype=torch.long)
        for b, s in enumerate(seqs):
            tokens[b, :len(s)] = torch.tensor(s)
        rows = torch.arange(len(seqs))
        for _ in range(new_tokens):
            tokens[rows, lengths] = model(tokens)[rows, lengths - 1].argmax(-1)
            lengths += 1
        for b, (_, _, answer) in enumerate(chunk):
            out = tokens[b, len(seqs[b]):lengths[b]].tolist()
            out = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
            right += normalise(tok.decode(out)) == normalise(answer)
    return round(right / max(1, len(items)), 4)


def build_vicuna(out: Path, seed: int = 0, steps: int = VICUNA_STEPS, quiet: bool = False,
                 n_eval: int = 900) -> dict:
    """out/vicuna: out/llama instruction-tuned on chat_corpus (all its weights, as Vicuna's), bf16;
    its exact-match scores on n_eval held-out instructions are added to out/backbones.json."""
    from model import Tokenizer, load_llama

    t0 = time.time()
    tok = Tokenizer(out / "tokenizer.model")
    model, _ = load_llama(out / "llama")
    data = [chat_tokens(tok, c, turns) for c, turns in chat_corpus(steps * LM_BATCH, seed)]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fit(model.train(), lambda step: chat_batch(data[step * LM_BATCH:(step + 1) * LM_BATCH]), steps,
            "instruction-tuning the tiny LLaMA", quiet)
    save_llama(model, out / "vicuna")
    model, _ = load_llama(out / "vicuna")  # score what is shipped
    held_out = [(c, *turns[0]) for c, turns in chat_corpus(n_eval, seed + 1)]
    text = [x for x in held_out if x[0] is None]
    image = [x for x in held_out if x[0] is not None]
    summary = json.loads((out / "backbones.json").read_text()) if (out / "backbones.json").is_file() else {}
    summary.update(vicuna_steps=steps, vicuna_exact_text=chat_accuracy(model.eval(), tok, text),
                   vicuna_exact_image_caption=chat_accuracy(model, tok, image),
                   vicuna_exact_image_no_caption=chat_accuracy(model, tok, [(None, p, a) for _, p, a in image]))
    (out / "backbones.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not quiet:
        print(f"tiny Vicuna: held-out exact answers: text {summary['vicuna_exact_text']:.1%}, image with its "
              f"caption {summary['vicuna_exact_image_caption']:.1%}, without "
              f"{summary['vicuna_exact_image_no_caption']:.1%} ({time.time() - t0:.0f}s)", flush=True)
    return summary


# ----------------------------------------------------------------------------- tiny CLIP

PLACES = ["middle", *shapes.SIDES_AT]  # where a single shape sits
# What the tower learns to tell, and how many classes each: the number of objects, their shape
# and colour (all the same in a counting scene), and where a single shape sits: enough for every
# image question.
CLIP_TASKS = {"count": 4, "shape": len(shapes.SHAPES), "color": len(shapes.COLORS), "place": len(PLACES)}


def random_scene(rng: random.Random) -> tuple[list, list]:
    """A scene of any kind the problems use, and its labels (-100: no such label)."""
    kind = rng.choices(["middle", "count", "side"], [2, 1, 1])[0]
    if kind == "count":
        scene, place = shapes.count_scene(rng, rng.randint(1, 4), rng.choice(shapes.SHAPES)), -100
    elif kind == "side":
        side = rng.choice(list(shapes.SIDES_AT))
        scene, place = shapes.side_scene(rng, side), PLACES.index(side)
    else:
        scene, place = shapes.single_scene(rng), 0
    shape, color = scene[0][:2]
    return scene, [len(scene) - 1, shapes.SHAPES.index(shape), list(shapes.COLORS).index(color), place]


def clip_batch(rng: random.Random, n: int):
    from clip import preprocess

    scenes = [random_scene(rng) for _ in range(n)]
    # LaVIN's own preprocessing (ImageNet mean/std), the one the shapes recipe trains with
    images = torch.stack([preprocess(shapes.render(s), "lavin", shapes.SIZE) for s, _ in scenes])
    return images, torch.tensor([labels for _, labels in scenes])  # (n, 3, 64, 64), (n, 4)


def clip_losses(vit, head, images, labels):
    """Summed cross-entropy of a linear head on CLIP's image embedding, and accuracy per task."""
    logits = head(vit.encode_image(images)).split(list(CLIP_TASKS.values()), dim=-1)
    loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
    accs = [(lg.argmax(-1) == labels[:, i])[labels[:, i] >= 0].float().mean().item()
            for i, lg in enumerate(logits)]
    return loss, accs


def sincos_grid(grid: int, width: int):
    """Fixed 2-D sine-cosine position codes (as in MAE), a zero row for [CLS]: (1 + g*g, width)."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    freq = 1.0 / 100 ** (torch.arange(width // 4) / (width // 4))
    codes = [f(p.flatten()[:, None] * freq) for p in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat([torch.zeros(1, width), torch.cat(codes, dim=1)])


def pretrain_clip(path: Path, steps: int, seed: int, quiet: bool) -> dict:
    """A ViT (64x64 input, 16-pixel patches, width 64, 12 blocks: LaVIN's every-4th [CLS] gives 3
    visual tokens) taught the scene attributes by supervised classification on fresh random
    scenes; the head is then dropped. Saved in fp16 with OpenAI's `visual.` keys. Returns the
    held-out accuracy of each attribute."""
    from clip import VisionTransformer

    rng = random.Random(seed + 104729)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vit = VisionTransformer(shapes.SIZE, CLIP_PATCH, CLIP_WIDTH, CLIP_LAYERS, 64)
        with torch.no_grad():  # knowing where each patch lies from step 0 saves most of a minute
            vit.positional_embedding.copy_(sincos_grid(vit.grid, vit.width))
        head = torch.nn.Linear(64, sum(CLIP_TASKS.values()))
        opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=CLIP_LR, weight_decay=0.05)
        for step in progress(range(steps), "pre-training the tiny CLIP", quiet):
            for g in opt.param_groups:  # warm-up, then cosine to 0
                g["lr"] = CLIP_LR * min(1.0, (step + 1) / 20) * (1 + math.cos(math.pi * step / steps)) / 2
            loss, _ = clip_losses(vit, head, *clip_batch(rng, CLIP_BATCH))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        vit.half().float()  # score what is shipped: the fp16 weights
        with torch.no_grad():
            _, accs = clip_losses(vit.eval(), head, *clip_batch(random.Random(seed + 1), 1000))
    path.parent.mkdir(parents=True)
    torch.save({f"visual.{k}": v.half() for k, v in vit.state_dict().items()}, path)
    return {name: round(acc, 4) for name, acc in zip(CLIP_TASKS, accs)}


# ----------------------------------------------------------------------------- all of them

def build(out: Path, seed: int = 0, lm_steps: int = LM_STEPS, clip_steps: int = CLIP_STEPS,
          quiet: bool = False, vicuna_steps: int = VICUNA_STEPS, vicuna_eval: int = 900) -> dict:
    """Every file of shapes.BACKBONE_FILES into out (created; must not exist); returns the summary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same bytes whatever the number of cores
    try:
        return build_in(out, seed, lm_steps, clip_steps, quiet, vicuna_steps, vicuna_eval)
    finally:
        torch.set_num_threads(threads)


def build_in(out: Path, seed: int, lm_steps: int, clip_steps: int, quiet: bool, vicuna_steps: int,
             vicuna_eval: int) -> dict:
    from model import Tokenizer, load_llama

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t0 = time.time()
    out.mkdir(parents=True)
    corpus = lm_corpus(lm_steps * LM_BATCH, seed)
    problems = list(shapes.make_problems(3000, seed)[0].values())  # texts of the set itself too
    texts = ["".join(shapes.problem_text(p)) for p, _ in corpus] + \
            ["".join(shapes.problem_text(p)) for p in problems]
    captions = sorted({c for _, c in corpus if c})
    train_tokenizer(texts + captions + ["Image: N/A", "Image: "], out / "tokenizer.model")
    tok = Tokenizer(out / "tokenizer.model")
    save_llama(pretrain_llama(tok, corpus, lm_steps, seed, quiet), out / "llama")
    model, _ = load_llama(out / "llama")  # score what is shipped: the bf16 weights, read back
    held_out = lm_corpus(600, seed + 1)  # another seed: problems the LLaMA never read
    text = [(p, None) for p, c in held_out if not c]
    image = [(p, c) for p, c in held_out if c]
    summary = {"seed": seed, "lm_steps": lm_steps, "clip_steps": clip_steps,
               "llama_acc_text": answer_accuracy(model, tok, text),
               "llama_acc_image_caption": answer_accuracy(model, tok, image),
               "llama_acc_image_no_caption": answer_accuracy(model, tok, [(p, None) for p, _ in image])}
    say(f"tiny LLaMA {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M: held-out accuracy "
        f"text {summary['llama_acc_text']:.1%}, image with its caption "
        f"{summary['llama_acc_image_caption']:.1%}, without {summary['llama_acc_image_no_caption']:.1%}"
        f" ({time.time() - t0:.0f}s)")
    accs = summary["clip_acc"] = pretrain_clip(out / "clip" / "ViT-tiny.pt", clip_steps, seed, quiet)
    say("tiny CLIP held-out accuracy " + ", ".join(f"{k} {v:.0%}" for k, v in accs.items())
        + f" ({time.time() - t0:.0f}s)")
    (out / "backbones.json").write_text(json.dumps(summary, indent=2) + "\n")
    return build_vicuna(out, seed, vicuna_steps, quiet, vicuna_eval)  # from the llama/ just written; adds its scores


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default=str(shapes.BACKBONES), help="output folder (must not exist)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-steps", type=int, default=LM_STEPS, help="tiny LLaMA AdamW steps")
    ap.add_argument("--clip-steps", type=int, default=CLIP_STEPS, help="tiny CLIP AdamW steps")
    ap.add_argument("--vicuna-steps", type=int, default=VICUNA_STEPS, help="tiny Vicuna AdamW steps")
    ap.add_argument("--add-vicuna", action="store_true",
                    help="only (re)make vicuna/ from the tokenizer and llama/ already in --out")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    t0 = time.time()
    if args.add_vicuna:
        shutil.rmtree(Path(args.out) / "vicuna", ignore_errors=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as build: the same bytes
        try:
            build_vicuna(Path(args.out), args.seed, args.vicuna_steps)
        finally:
            torch.set_num_threads(threads)
        return
    if Path(args.out).exists():
        raise SystemExit(f"error: {args.out} exists: remove it first, or give another --out")
    build(Path(args.out), args.seed, args.lm_steps, args.clip_steps, vicuna_steps=args.vicuna_steps)
    print(f"backbones: done in {time.time() - t0:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()
