"""`shapes`: a synthetic ScienceQA that runs the whole LaVIN pipeline on a laptop CPU.

ScienceQA needs a 7B LLaMA and a ViT-L/14 to mean anything. This module writes a stand-in in
ScienceQA's exact release layout, plus tiny backbones in the official checkpoint formats, so
training, sampling and the accuracy table run end to end in minutes with nothing downloaded:

    9 problem families (3 subjects x {image, hint, no context}), seeded
      ├─> problems.json, pid_splits.json, captions.json, images/{split}/{pid}/image.png (64x64)
      │     image: colour / shape / count / position; the answer is only in the picture
      │     hint:  the answer is stated in the hint (upper grades add a decoy sentence)
      │     none:  a small fact (sides of a polygon, opposite directions, word groups)
      ├─> all prompts + targets ──sentencepiece──> tokenizer.model
      └─> a fresh stream of hint/fact problems ──AdamW──> llama/params.json, consolidated.00.pth
    random scenes ──AdamW, attribute classification──> clip/ViT-tiny.pt (OpenAI `visual.` keys)

The tiny LLaMA answers text problems before LaVIN starts (as a real LLaMA does) and is at chance
on image problems: only the visual tokens and the adapters can close that gap. shapes.json
records how well each backbone learnt. Everything is seeded: the same seed gives the same bytes
(on one machine; float sums may differ across CPUs).

    python -m data.shapes [--root data/shapes] [--n 3000] [--seed 0]     ~2.5 min on 2 cores
    ensure(root)   # the same, once, if the set is not there yet
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels: small enough for a CPU ViT, big enough to see a star
COLORS = {"red": (220, 30, 30), "blue": (30, 70, 220), "green": (30, 160, 50),
          "yellow": (235, 200, 0), "purple": (140, 40, 170), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle", "diamond", "star"]
NAMES = ["Tom", "Ana", "Leo", "Mia", "Sam", "Zoe", "Ben", "Ivy", "Max", "Kim", "Raj", "Eva"]
TOYS = ["ball", "kite", "hat", "bike", "cup", "boat", "car", "drum"]
TOWNS = ["Oakville", "Pine City", "Riverton", "Lakewood", "Hillsboro", "Sunnyvale", "Maple Bay"]
WEATHER = ["sunny", "rainy", "snowy", "cloudy", "windy", "foggy"]
DAYS = ["Monday", "Tuesday", "Friday", "Sunday"]
SIDES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
WORDS = {"color": ["red", "blue", "green", "pink"], "animal": ["dog", "cat", "horse", "frog"],
         "fruit": ["apple", "pear", "grape", "plum"], "tool": ["hammer", "saw", "drill", "rake"]}
NUMBER = ["zero", "one", "two", "three", "four"]
LETTERS = "ABCD"  # at most 4 choices
# pretrain_llama: the letter binding only appears after ~1000-1400 steps, so 1700
LM_DIM, LM_HEADS, LM_LR, LM_BATCH, ANSWER_WEIGHT, LM_STEPS = 96, 8, 2e-3, 32, 5.0, 1700
CLIP_LR, CLIP_BATCH, CLIP_STEPS = 1e-3, 64, 400  # pretrain_clip


# ----------------------------------------------------------------------------- drawing

def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, rgb):
    """One filled shape centred at (x, y) with half-size r."""
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=rgb)
    elif shape == "star":  # ten corners alternating between the outer and an inner radius
        pts = [(x + (r if i % 2 == 0 else 0.45 * r) * math.sin(i * math.pi / 5),
                y - (r if i % 2 == 0 else 0.45 * r) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(pts, fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: list) -> Image.Image:
    """A scene is a list of (shape, colour, x, y, r); white background."""
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for shape, color, x, y, r in scene:
        draw_shape(draw, shape, x, y, r, COLORS[color])
    return img


def single_scene(rng: random.Random) -> list:
    # Near the centre: a tiny ViT trained for a minute cannot yet tell shapes anywhere in the frame.
    x, y = SIZE // 2 + rng.randint(-3, 3), SIZE // 2 + rng.randint(-3, 3)
    return [(rng.choice(SHAPES), rng.choice(list(COLORS)), x, y, rng.randint(12, 20))]


def count_scene(rng: random.Random, k: int, shape: str) -> list:
    """k equal shapes in distinct cells of a 3x3 grid, so they never overlap."""
    color, cell = rng.choice(list(COLORS)), SIZE // 3
    cells = rng.sample(range(9), k)
    return [(shape, color, (c % 3) * cell + cell // 2 + rng.randint(-1, 1),
             (c // 3) * cell + cell // 2 + rng.randint(-1, 1), rng.randint(7, 8)) for c in cells]


def pair_scene(rng: random.Random, horizontal: bool) -> list:
    """Two different shapes, the first on the left (horizontal) or at the top (vertical)."""
    a, b = rng.sample(SHAPES, 2)
    near, far, across = rng.randint(15, 18), rng.randint(46, 49), rng.randint(28, 36)
    pos = [(near, across), (far, across)] if horizontal else [(across, near), (across, far)]
    return [(s, rng.choice(list(COLORS)), x, y, rng.randint(11, 14))
            for s, (x, y) in zip((a, b), pos)]


# ----------------------------------------------------------------------------- problem families
# Each family returns (hint, question, answer, choices, solution, scene or None, caption).

def plural(k: int, noun: str) -> str:
    return f"{NUMBER[k]} {noun}" + ("s" if k != 1 else "")


def a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def options(rng, answer: str, pool, hard: bool, must=()) -> list:
    """3 choices (4 for the upper grades): the answer, the `must` distractors, random others from
    pool, shuffled so that the answer's letter carries no information."""
    rest = [c for c in dict.fromkeys(pool) if c != answer and c not in must]
    n_more = min((len(LETTERS) if hard else 3) - 1 - len(must), len(rest))
    choices = [answer, *must, *rng.sample(rest, max(0, n_more))]
    rng.shuffle(choices)
    return choices


def img_color(rng, hard):
    scene = single_scene(rng)
    shape, color = scene[0][:2]
    return ("", "What color is the shape?", color, options(rng, color, COLORS, hard),
            f"The {shape} is {color}.", scene, f"{a(color).capitalize()} {shape}.")


def img_shape(rng, hard):
    scene = single_scene(rng)
    shape, color = scene[0][:2]
    return ("", "Which shape is in the picture?", shape, options(rng, shape, SHAPES, hard),
            f"The picture shows {a(shape)}.", scene, f"{a(color).capitalize()} {shape}.")


def img_count(rng, hard):
    shape, k = rng.choice(SHAPES), rng.randint(1, 4)
    scene = count_scene(rng, k, shape)
    return ("", f"How many {shape}s are there?", str(k), options(rng, str(k), "1234", hard),
            f"Count the {shape}s one by one.\nThere {'is' if k == 1 else 'are'} {plural(k, shape)}.",
            scene, f"{plural(k, scene[0][1] + ' ' + shape).capitalize()}.")


def img_position(rng, hard):
    horizontal = rng.random() < 0.5
    scene = pair_scene(rng, horizontal)
    sides = ("left", "right") if horizontal else ("top", "bottom")
    i = rng.randrange(2)
    side, shape, other = sides[i], scene[i][0], scene[1 - i][0]
    # Both shapes of the picture are always options, so the text alone cannot tell them apart.
    return ("", f"Which shape is on the {side}?", shape, options(rng, shape, SHAPES, hard, [other]),
            f"The {shape} is on the {side}.", scene,
            f"{a(scene[0][1]).capitalize()} {scene[0][0]} on the {sides[0]} and "
            f"{a(scene[1][1])} {scene[1][0]} on the {sides[1]}.")


def img_describe(rng, hard):
    scene = single_scene(rng)
    shape, color = scene[0][:2]
    answer = a(f"{color} {shape}")
    # Distractors share the colour or the shape: one attribute alone does not decide.
    pool = [a(f"{c} {shape}") for c in COLORS] + [a(f"{color} {s}") for s in SHAPES]
    return ("", "Which phrase describes the picture?", answer, options(rng, answer, pool, hard),
            f"The picture shows {answer}.", scene, f"{answer.capitalize()}.")


def fact_and_decoy(rng, hard, fact: str, decoy: str) -> str:
    """The upper grades hide the fact beside a similar sentence whose value is also an option."""
    if not hard:
        return fact
    return f"{fact} {decoy}" if rng.random() < 0.5 else f"{decoy} {fact}"


def txt_weather(rng, hard):
    (town, town2), day, (w, w2) = rng.sample(TOWNS, 2), rng.choice(DAYS), rng.sample(WEATHER, 2)
    hint = fact_and_decoy(rng, hard, f"It was {w} in {town} on {day}.",
                          f"It was {w2} in {town2} on {day}.")
    return (hint, f"What was the weather in {town} on {day}?", w,
            options(rng, w, WEATHER, hard, [w2] if hard else []),
            f"The text says it was {w} in {town}.", None, None)


def txt_town(rng, hard):
    (name, name2), (town, town2) = rng.sample(NAMES, 2), rng.sample(TOWNS, 2)
    hint = fact_and_decoy(rng, hard, f"{name} lives in {town}.", f"{name2} lives in {town2}.")
    return (hint, f"Where does {name} live?", town,
            options(rng, town, TOWNS, hard, [town2] if hard else []),
            f"The text says that {name} lives in {town}.", None, None)


def txt_toy(rng, hard):
    (name, name2), (toy, toy2) = rng.sample(NAMES, 2), rng.sample(TOYS, 2)
    c, c2 = rng.sample(list(COLORS), 2)
    hint = fact_and_decoy(rng, hard, f"{name} has {a(c)} {toy}.", f"{name2} has {a(c2)} {toy2}.")
    return (hint, f"What color is {name}'s {toy}?", c,
            options(rng, c, COLORS, hard, [c2] if hard else []),
            f"The text says that {name}'s {toy} is {c}.", None, None)


def fact_sides(rng, hard):
    shape = rng.choice(list(SIDES))
    return ("", f"Which shape has {SIDES[shape]} sides?", shape, options(rng, shape, SIDES, hard),
            f"{a(shape).capitalize()} has {SIDES[shape]} sides.", None, None)


def fact_direction(rng, hard):
    d = rng.choice(list(OPPOSITE))
    return ("", f"Which direction is opposite {d}?", OPPOSITE[d],
            options(rng, OPPOSITE[d], OPPOSITE, hard), f"{OPPOSITE[d].capitalize()} is opposite {d}.",
            None, None)


def fact_word(rng, hard):
    kind = rng.choice(list(WORDS))
    word = rng.choice(WORDS[kind])
    others = [w for k, ws in WORDS.items() if k != kind for w in ws]
    return ("", f"Which word names {a(kind)}?", word, options(rng, word, others, hard),
            f"The word {word} names {a(kind)}.", None, None)


LECTURE_PICTURE = "Look closely at the picture.\nColor, shape, number and place can all be seen."
# (subject, modality, topic, category, skill, lecture, make); round-robin over these 9 cells.
FAMILIES = [
    ("natural science", "img", "physics", "Shapes and colors", "Identify colors and shapes",
     LECTURE_PICTURE, (img_color, img_shape, img_count)),
    ("natural science", "txt", "earth-science", "Weather and climate", "Read about the weather",
     "Weather is what the air is like at a certain place and time.\nIt can change from day to day.",
     (txt_weather,)),
    ("natural science", "no", "physics", "Polygons", "Count the sides of a polygon",
     "A polygon is a flat shape with straight sides. A triangle has 3 sides, a square 4, a "
     "pentagon 5, a hexagon 6 and an octagon 8.", (fact_sides,)),
    ("social science", "img", "geography", "Maps", "Tell left from right and top from bottom",
     "Left, right, top and bottom tell where things are in a picture or on a map.", (img_position,)),
    ("social science", "txt", "geography", "Places", "Find where a person lives",
     "A town is a place where people live and work.", (txt_town,)),
    ("social science", "no", "geography", "Cardinal directions", "Use cardinal directions",
     "The four cardinal directions are north, south, east and west.\nNorth is opposite south, "
     "and east is opposite west.", (fact_direction,)),
    ("language science", "img", "writing-strategies", "Descriptive details",
     "Choose the phrase that describes a picture", LECTURE_PICTURE, (img_describe,)),
    ("language science", "txt", "reading-comprehension", "Reading for details",
     "Find a detail in a text", "Read the text carefully. The answer is stated in it.", (txt_toy,)),
    ("language science", "no", "vocabulary", "Categories", "Sort words into groups",
     "Words can be sorted into groups such as colors, animals, fruits and tools.", (fact_word,)),
]


def make_problem(rng: random.Random, family: tuple, grade: int) -> tuple[dict, list | None, str]:
    """One problem dict in ScienceQA's schema (split still unset), its scene and caption."""
    subject, _, topic, category, skill, lecture, makers = family
    hard = grade >= 7  # the upper grades get a distracting second sentence and more options
    hint, question, answer, choices, solution, scene, caption = rng.choice(makers)(rng, hard)
    return ({"question": question, "choices": choices, "answer": choices.index(answer),
             "hint": hint, "image": "image.png" if scene else None, "task": "closed choice",
             "grade": f"grade{grade}", "subject": subject, "topic": topic, "category": category,
             "skill": skill, "lecture": lecture, "solution": solution, "split": None},
            scene, caption)


SPLIT_CYCLE = ["train", "val", "test", "train", "train"]  # 60/20/20, and the first 3 cover all


def make_problems(n: int, seed: int) -> tuple[dict, dict, dict, dict]:
    """problems, pid_splits, captions, scenes for n problems.

    Problems cycle over the 9 (subject, modality) cells and alternate grade bands (G1-6, G7-12);
    each of the 18 (cell, band) groups is then split in turn over SPLIT_CYCLE, so with n >= 54
    every column of the accuracy table has problems in every split.
    """
    rng = random.Random(seed)
    problems, scenes, captions, seen = {}, {}, {}, {}
    splits = {"train": [], "val": [], "test": []}
    for i in range(n):
        cell, band = i % len(FAMILIES), (i // len(FAMILIES)) % 2
        grade = rng.randint(1, 6) if band == 0 else rng.randint(7, 12)
        pid = str(i + 1)
        problem, scene, caption = make_problem(rng, FAMILIES[cell], grade)
        k = seen[cell, band] = seen.get((cell, band), -1) + 1
        problem["split"] = SPLIT_CYCLE[k % len(SPLIT_CYCLE)]
        problems[pid] = problem
        splits[problem["split"]].append(pid)
        if scene:
            scenes[pid], captions[pid] = scene, caption
    splits["trainval"] = splits["train"] + splits["val"]
    splits["minival"], splits["minitest"] = splits["val"][::4], splits["test"][::4]
    return problems, splits, {"captions": captions}, scenes


def write_problems(folder: Path, n: int, seed: int) -> dict:
    """The ScienceQA release files under folder; returns the problems."""
    problems, splits, captions, scenes = make_problems(n, seed)
    for name, obj in (("problems.json", problems), ("pid_splits.json", splits),
                      ("captions.json", captions)):
        (folder / name).write_text(json.dumps(obj, indent=2) + "\n")
    for pid, scene in scenes.items():
        path = folder / "images" / problems[pid]["split"] / pid / "image.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render(scene).save(path, format="PNG")  # PIL writes no timestamp: same pixels, same bytes
    return problems


# ----------------------------------------------------------------------------- tokenizer

def problem_text(problem: dict) -> tuple[str, str]:
    from data.scienceqa import build_prompt  # the one prompt builder (QCM-ALE), never a copy

    return build_prompt(problem)


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
        user_defined_symbols=list(LETTERS), num_threads=1, minloglevel=2)  # 1 thread: same merges
    path.write_bytes(buf.getvalue())


# ----------------------------------------------------------------------------- tiny LLaMA

def lm_corpus(n: int, seed: int) -> list:
    """The tiny LLaMA's 'web text': a fresh seeded stream of hint and fact problems (no image
    problems: a text model cannot have learnt to see), disjoint in seed from the set itself."""
    # Hint problems twice as often as facts: a few facts are soon known, reading takes longer.
    families = [f for f in FAMILIES if f[1] == "txt"] * 2 + [f for f in FAMILIES if f[1] == "no"]
    rng = random.Random(seed + 7919)
    return [make_problem(rng, families[i % len(families)], rng.randint(1, 12))[0] for i in range(n)]


def encode_for_lm(tok, problem: dict) -> tuple[list, int]:
    """BOS prompt "The answer is X." EOS, and where the answer's tokens start. Pre-training stops
    after the letter: the LaVIN fine-tuning teaches the "BECAUSE: lecture solution" part."""
    prompt, target = problem_text(problem)
    ids = tok.encode(prompt + target.split(" BECAUSE:")[0], bos=True, eos=True)
    return ids, len(tok.encode(prompt + "The answer is", bos=True, eos=False))


def lm_batch(batch: list):
    """Right-padded (tokens, next-token targets, loss weights) for (ids, answer start) pairs."""
    import torch

    T = max(len(ids) for ids, _ in batch) - 1
    tokens = torch.zeros(len(batch), T, dtype=torch.long)  # 0 (unk) pads; its weight is 0
    targets, weights = torch.zeros_like(tokens), torch.zeros(len(batch), T)
    for b, (ids, start) in enumerate(batch):
        n = len(ids) - 1
        tokens[b, :n], targets[b, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        weights[b, :n] = 1.0  # all text is language to model; copying names from the hint helps
        weights[b, start - 1:n] = ANSWER_WEIGHT  # the targets " X." EOS: the point of it all
    return tokens, targets, weights


def pretrain_llama(folder: Path, tok_path: Path, corpus: list, steps: int, seed: int, quiet: bool):
    """A small Llama trained with AdamW on the corpus, one pass, saved in Meta's layout."""
    import torch
    import torch.nn.functional as F
    from model import Llama, ModelArgs, Tokenizer

    tok = Tokenizer(tok_path)
    # More heads than the width needs: more chances that one of them learns the binding early.
    args = ModelArgs(dim=LM_DIM, n_layers=4, n_heads=LM_HEADS, n_kv_heads=LM_HEADS,
                     vocab_size=tok.n_words, multiple_of=32, norm_eps=1e-5, max_seq_len=512)
    data = [encode_for_lm(tok, p) for p in corpus]
    with torch.random.fork_rng():  # seed locally: the caller's random stream stays as it was
        torch.manual_seed(seed)
        model = Llama(args)
        opt = torch.optim.AdamW(model.parameters(), lr=LM_LR, betas=(0.9, 0.95), weight_decay=0.0)
        for step in progress(range(steps), "pre-training the tiny LLaMA", quiet):
            tokens, targets, weights = lm_batch(data[step * LM_BATCH:(step + 1) * LM_BATCH])
            for g in opt.param_groups:  # warm-up, hold (the binding is learnt late), decay to a tenth
                g["lr"] = LM_LR * min((step + 1) / 30, 1.0, 0.1 + 0.9 * (steps - step) / (0.2 * steps))
            loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), reduction="none")
            loss = (loss * weights.flatten()).sum() / weights.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    folder.mkdir(parents=True)
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier",
            "norm_eps", "rope_theta")
    params = {**{k: getattr(args, k) for k in keys}, "vocab_size": -1}  # -1: from the tokenizer
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    torch.save(model.state_dict(), folder / "consolidated.00.pth")  # one shard, Meta's key names
    return model.eval(), tok


def answer_accuracy(model, tok, problems: list) -> float:
    """Share of problems answered right from the prompt alone (no image): greedy decoding of three
    tokens after "The answer is", read with the evaluation's own pattern."""
    import torch
    from data.table import parse_answer

    right = 0
    for i in range(0, len(problems), 64):
        chunk = problems[i:i + 64]
        seqs = [tok.encode(problem_text(p)[0] + "The answer is", bos=True, eos=False) for p in chunk]
        lengths = torch.tensor([len(s) for s in seqs])
        tokens = torch.zeros(len(seqs), int(lengths.max()) + 3, dtype=torch.long)  # right-padded:
        for b, s in enumerate(seqs):  # harmless, as each sample only reads its own real positions
            tokens[b, :len(s)] = torch.tensor(s)
        rows = torch.arange(len(seqs))
        with torch.no_grad():
            for _ in range(3):
                tokens[rows, lengths] = model(tokens)[rows, lengths - 1].argmax(-1)
                lengths += 1
        for b, p in enumerate(chunk):  # decode it all: sentencepiece drops a leading space
            text = tok.decode(tokens[b, :lengths[b]].tolist())
            answer = text[text.rindex("The answer is"):]
            right += parse_answer(answer, len(p["choices"])) == p["answer"]
    return round(right / max(1, len(problems)), 4)


# ----------------------------------------------------------------------------- tiny CLIP

def random_scene(rng: random.Random) -> tuple[list, str]:
    """A scene of any kind the problems use, and that kind."""
    kind = rng.choices(["single", "count", "left-right", "top-bottom"], [4, 3, 1.5, 1.5])[0]
    if kind == "single":
        return single_scene(rng), kind
    if kind == "count":
        return count_scene(rng, rng.randint(1, 4), rng.choice(SHAPES)), kind
    return pair_scene(rng, kind == "left-right"), kind


# What the tower learns to tell, and how many classes each: number of objects, shape and colour
# of the first (left/top) and the last (right/bottom) object, kind of scene. Enough for every
# image question; the shapes of counted objects are not asked, so they carry no loss (-100).
CLIP_TASKS = {"count": 4, "first_shape": len(SHAPES), "last_shape": len(SHAPES),
              "first_color": len(COLORS), "last_color": len(COLORS), "kind": 4}


def scene_labels(scene: list, kind: str) -> list:
    shape = (lambda i: -100) if kind == "count" else (lambda i: SHAPES.index(scene[i][0]))
    colors, kinds = list(COLORS), ["single", "count", "left-right", "top-bottom"]
    return [len(scene) - 1, shape(0), shape(-1), colors.index(scene[0][1]),
            colors.index(scene[-1][1]), kinds.index(kind)]


def clip_batch(rng: random.Random, n: int):
    import torch
    from clip import preprocess

    scenes = [random_scene(rng) for _ in range(n)]
    images = torch.stack([preprocess(render(s), "clip", SIZE) for s, _ in scenes])  # (n, 3, 64, 64)
    return images, torch.tensor([scene_labels(*s) for s in scenes])  # (n, 6)


def clip_losses(vit, head, images, labels):
    """Summed cross-entropy of a linear head on CLIP's image embedding, and accuracy per task."""
    import torch.nn.functional as F

    logits = head(vit.encode_image(images)).split(list(CLIP_TASKS.values()), dim=-1)
    loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
    accs = [(lg.argmax(-1) == labels[:, i])[labels[:, i] >= 0].float().mean().item()
            for i, lg in enumerate(logits)]
    return loss, accs


def sincos_grid(grid: int, width: int):
    """Fixed 2-D sine-cosine position codes (as in MAE), a zero row for [CLS]: (1 + g*g, width)."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    freq = 1.0 / 100 ** (torch.arange(width // 4) / (width // 4))
    codes = [f(p.flatten()[:, None] * freq) for p in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat([torch.zeros(1, width), torch.cat(codes, dim=1)])


def pretrain_clip(path: Path, steps: int, seed: int, quiet: bool) -> dict:
    """A ViT (64x64 input, 16-pixel patches, width 64, 12 blocks: LaVIN's every-4th [CLS] gives 3
    visual tokens) taught the scene attributes by supervised classification on fresh random
    scenes; the head is then dropped. Saved with OpenAI's `visual.` keys. Returns the held-out
    accuracy of each attribute."""
    import torch
    from clip import VisionTransformer

    rng = random.Random(seed + 104729)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vit = VisionTransformer(SIZE, 16, 64, 12, 64)
        with torch.no_grad():  # knowing where each patch lies from step 0 saves most of a minute
            vit.positional_embedding.copy_(sincos_grid(vit.grid, vit.width))
        head = torch.nn.Linear(64, sum(CLIP_TASKS.values()))
        params = [*vit.parameters(), *head.parameters()]
        opt = torch.optim.AdamW(params, lr=CLIP_LR, weight_decay=0.05)
        for step in progress(range(steps), "pre-training the tiny CLIP", quiet):
            for g in opt.param_groups:  # warm-up, then cosine to 0
                g["lr"] = CLIP_LR * min(1.0, (step + 1) / 20) * (1 + math.cos(math.pi * step / steps))
                g["lr"] /= 2
            loss, _ = clip_losses(vit, head, *clip_batch(rng, CLIP_BATCH))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            _, accs = clip_losses(vit.eval(), head, *clip_batch(random.Random(seed + 1), 500))
    path.parent.mkdir(parents=True)
    torch.save({f"visual.{k}": v for k, v in vit.state_dict().items()}, path)
    return {name: round(acc, 4) for name, acc in zip(CLIP_TASKS, accs)}


# ----------------------------------------------------------------------------- the whole set

def progress(it, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(it, desc=desc, disable=quiet, leave=False, mininterval=1.0)


def build(folder: Path, n: int, seed: int, lm_steps: int, clip_steps: int, quiet: bool) -> dict:
    """Everything into folder (which must exist and be empty); returns a summary."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t0 = time.time()
    problems = write_problems(folder, n, seed)
    say(f"shapes: {n} problems written ({time.time() - t0:.1f}s)")
    corpus = lm_corpus(lm_steps * LM_BATCH, seed)  # one pass: every step sees new problems
    texts = ["".join(problem_text(p)) for p in [*problems.values(), *corpus]]
    train_tokenizer(texts + ["Image: N/A", "Image: "], folder / "tokenizer.model")
    model, tok = pretrain_llama(folder / "llama", folder / "tokenizer.model", corpus, lm_steps, seed,
                                quiet)
    val = [p for p in problems.values() if p["split"] == "val"]
    summary = {"n_problems": n, "seed": seed, "lm_steps": lm_steps, "clip_steps": clip_steps,
               "llama_val_acc_text": answer_accuracy(model, tok, [p for p in val if not p["image"]]),
               "llama_val_acc_image": answer_accuracy(model, tok, [p for p in val if p["image"]])}
    say(f"shapes: tiny LLaMA {sum(t.numel() for t in model.parameters()) / 1e6:.2f}M, val accuracy "
        f"text-only {summary['llama_val_acc_text']:.1%}, image {summary['llama_val_acc_image']:.1%} "
        f"({time.time() - t0:.1f}s)")
    accs = summary["clip_heldout_acc"] = pretrain_clip(folder / "clip" / "ViT-tiny.pt", clip_steps,
                                                       seed, quiet)
    say("shapes: tiny CLIP held-out accuracy " + ", ".join(f"{k} {v:.0%}" for k, v in accs.items())
        + f" ({time.time() - t0:.1f}s)")
    (folder / "shapes.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def generate(root="data/shapes", n_problems: int = 3000, seed: int = 0, lm_steps: int = LM_STEPS,
             clip_steps: int = CLIP_STEPS, quiet: bool = False) -> dict:
    """Write the whole set to root, replacing an earlier set there; returns the summary. Built in
    a sibling folder and renamed into place, so an interrupted run never leaves a set that looks
    complete. n_problems >= 54 puts every column of the accuracy table in every split."""
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / "problems.json").is_file():
        raise FileExistsError(f"{root} exists and is not a shapes set: refusing to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would leave the set unreadable to others
    try:
        summary = build(tmp, n_problems, seed, lm_steps, clip_steps, quiet)
        if root.exists():  # move the old set aside first: rename cannot replace a full folder
            old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(root, old)
            shutil.rmtree(old)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def is_complete(root) -> bool:
    root = Path(root)
    return all((root / f).is_file() for f in ("problems.json", "pid_splits.json", "tokenizer.model",
                                              "llama/params.json", "llama/consolidated.00.pth",
                                              "clip/ViT-tiny.pt", "shapes.json"))


def ensure(root="data/shapes", **kwargs) -> Path:
    """The set at root, generated first if it is not there (build_dataset calls this)."""
    root = Path(root)
    if not is_complete(root):
        generate(root, **kwargs)
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="data/shapes", help="output folder (replaced if it holds a set)")
    ap.add_argument("--n", type=int, default=3000, help="number of problems (at least 54)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-steps", type=int, default=LM_STEPS, help="tiny LLaMA AdamW steps")
    ap.add_argument("--clip-steps", type=int, default=CLIP_STEPS, help="tiny CLIP AdamW steps")
    args = ap.parse_args(argv)
    t0 = time.time()
    generate(args.root, args.n, args.seed, args.lm_steps, args.clip_steps)
    print(f"shapes: done in {time.time() - t0:.0f}s -> {args.root}")


if __name__ == "__main__":
    main()
