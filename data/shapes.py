"""`shapes`: a synthetic ScienceQA that runs the whole LaVIN pipeline on a laptop CPU.

ScienceQA needs a 7B LLaMA and a ViT-L/14 to mean anything. This module writes a stand-in in
ScienceQA's exact release layout, with tiny backbones in the official checkpoint formats, so
training, sampling and the accuracy table run end to end in minutes with nothing downloaded:

    9 problem families (3 subjects x {image, hint, no context}), seeded
      ├─> problems.json, pid_splits.json, captions.json, images/{split}/{pid}/image.png (64x64)
      │     image: colour / shape / count / side; the answer is only in the picture
      │     hint:  the answer is stated in the hint; upper grades have 4 options, not 3
      │     none:  a small fact (sides of a polygon, opposite directions, word groups)
      └─> + a copy of data/shapes_backbones: tokenizer.model, llama/, clip/ViT-tiny.pt
            (made by data/backbones.py: a LLaMA that reads text and captions, never pixels,
             and a CLIP that tells the scene attributes apart)

The same seed gives the same bytes.

    python -m data.shapes [--root data/shapes] [--n 6000] [--seed 0]     a few seconds
    ensure(root)   # the same, once, if the set is not there yet
"""
from __future__ import annotations

import argparse
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
N_PROBLEMS = 6000  # 3,600 to train on: enough pictures that the adapters learn to see, not to remember
BACKBONES = Path(__file__).parent / "shapes_backbones"  # shipped; made by python -m data.backbones
BACKBONE_FILES = ("tokenizer.model", "llama/params.json", "llama/consolidated.00.pth",
                  "clip/ViT-tiny.pt", "backbones.json")


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
    # Near the centre and large: the colour and shape questions are about what, not where.
    x, y = SIZE // 2 + rng.randint(-3, 3), SIZE // 2 + rng.randint(-3, 3)
    return [(rng.choice(SHAPES), rng.choice(list(COLORS)), x, y, rng.randint(12, 20))]


def count_scene(rng: random.Random, k: int, shape: str) -> list:
    """k equal shapes in distinct cells of a 3x3 grid, so they never overlap."""
    color, cell = rng.choice(list(COLORS)), SIZE // 3
    cells = rng.sample(range(9), k)
    return [(shape, color, (c % 3) * cell + cell // 2 + rng.randint(-1, 1),
             (c // 3) * cell + cell // 2 + rng.randint(-1, 1), rng.randint(7, 8)) for c in cells]


SIDES_AT = {"left": (15, 32), "right": (49, 32), "top": (32, 15), "bottom": (32, 49)}


def side_scene(rng: random.Random, side: str) -> list:
    """One shape near the middle of a side of the frame (a few pixels of jitter)."""
    x, y = SIDES_AT[side]
    return [(rng.choice(SHAPES), rng.choice(list(COLORS)), x + rng.randint(-2, 2), y + rng.randint(-2, 2),
             rng.randint(10, 12))]


# ----------------------------------------------------------------------------- problem families
# Each family returns (hint, question, answer, choices, solution, scene or None, caption).

def plural(k: int, noun: str) -> str:
    return f"{NUMBER[k]} {noun}" + ("s" if k != 1 else "")


def a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def options(rng, answer: str, pool, hard: bool) -> list:
    """3 choices (4 for the upper grades): the answer and random others from pool, shuffled so
    that the answer's letter carries no information."""
    rest = [c for c in dict.fromkeys(pool) if c != answer]
    choices = [answer, *rng.sample(rest, min((len(LETTERS) if hard else 3) - 1, len(rest)))]
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
            scene, f"{k} {scene[0][1]} {shape}{'s' if k > 1 else ''}.")  # digits, as the options


def img_side(rng, hard):
    side = rng.choice(list(SIDES_AT))
    scene = side_scene(rng, side)
    shape, color = scene[0][:2]
    return ("", f"Where is the {shape}?", side, options(rng, side, SIDES_AT, hard),
            f"The {shape} is on the {side}.", scene, f"{a(color).capitalize()} {shape} on the {side}.")


def img_describe(rng, hard):
    scene = single_scene(rng)
    shape, color = scene[0][:2]
    answer = a(f"{color} {shape}")
    # Distractors differ in both colour and shape (a 0.6M-parameter LLaMA cannot yet weigh two
    # attributes at once: with shared ones it read even the captions at 41%).
    pool = [a(f"{c} {s}") for c in COLORS for s in SHAPES if c != color and s != shape]
    return ("", "Which phrase describes the picture?", answer, options(rng, answer, pool, hard),
            f"The picture shows {answer}.", scene, f"{answer.capitalize()}.")


def txt_weather(rng, hard):
    town, day, w = rng.choice(TOWNS), rng.choice(DAYS), rng.choice(WEATHER)
    return (f"It was {w} in {town} on {day}.", f"What was the weather in {town} on {day}?", w,
            options(rng, w, WEATHER, hard),
            f"The text says it was {w} in {town}.", None, None)


def txt_town(rng, hard):
    name, town = rng.choice(NAMES), rng.choice(TOWNS)
    return (f"{name} lives in {town}.", f"Where does {name} live?", town, options(rng, town, TOWNS, hard),
            f"The text says that {name} lives in {town}.", None, None)


def txt_toy(rng, hard):
    name, toy, c = rng.choice(NAMES), rng.choice(TOYS), rng.choice(list(COLORS))
    return (f"{name} has {a(c)} {toy}.", f"What color is {name}'s {toy}?", c, options(rng, c, COLORS, hard),
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
    ("natural science", "img", "physics", "Counting", "Count the shapes in a picture",
     LECTURE_PICTURE, (img_count,)),
    ("natural science", "txt", "earth-science", "Weather and climate", "Read about the weather",
     "Weather is what the air is like at a certain place and time.\nIt can change from day to day.",
     (txt_weather,)),
    ("natural science", "no", "physics", "Polygons", "Count the sides of a polygon",
     "A polygon is a flat shape with straight sides. A triangle has 3 sides, a square 4, a "
     "pentagon 5, a hexagon 6 and an octagon 8.", (fact_sides,)),
    ("social science", "img", "geography", "Maps", "Tell left from right and top from bottom",
     "Left, right, top and bottom tell where things are in a picture or on a map.", (img_side,)),
    ("social science", "txt", "geography", "Places", "Find where a person lives",
     "A town is a place where people live and work.", (txt_town,)),
    ("social science", "no", "geography", "Cardinal directions", "Use cardinal directions",
     "The four cardinal directions are north, south, east and west.\nNorth is opposite south, "
     "and east is opposite west.", (fact_direction,)),
    ("language science", "img", "writing-strategies", "Descriptive details",
     "Name the colors and shapes in a picture", LECTURE_PICTURE, (img_color, img_shape, img_describe)),
    ("language science", "txt", "reading-comprehension", "Reading for details",
     "Find a detail in a text", "Read the text carefully. The answer is stated in it.", (txt_toy,)),
    ("language science", "no", "vocabulary", "Categories", "Sort words into groups",
     "Words can be sorted into groups such as colors, animals, fruits and tools.", (fact_word,)),
]


def make_problem(rng: random.Random, family: tuple, grade: int) -> tuple[dict, list | None, str]:
    """One problem dict in ScienceQA's schema (split still unset), its scene and caption."""
    subject, _, topic, category, skill, lecture, makers = family
    hard = grade >= 7  # the upper grades get four options instead of three
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


def problem_text(problem: dict) -> tuple[str, str]:
    from data.scienceqa import build_prompt  # the one prompt builder (QCM-ALE), never a copy

    return build_prompt(problem)


# ----------------------------------------------------------------------------- the whole set

def generate(root="data/shapes", n_problems: int = N_PROBLEMS, seed: int = 0, backbones=BACKBONES,
             quiet: bool = False) -> Path:
    """Write the set to root with a copy of the tiny backbones, replacing an earlier set there.
    Built in a sibling folder and renamed into place, so an interrupted run never leaves a set
    that looks complete. n_problems >= 54 puts every column of the accuracy table in every split."""
    t0 = time.time()
    root = write_set(root, "shapes", "problems.json", lambda folder: write_problems(folder, n_problems, seed),
                     backbones, BACKBONE_FILES)
    if not quiet:
        print(f"shapes: {n_problems} problems and the tiny backbones written to {root} "
              f"({time.time() - t0:.1f}s)", flush=True)
    return root


def write_set(root, kind: str, marker: str, write, backbones, backbone_files) -> Path:
    """A synthetic set (this one, shapes-chat's, shapes-coco's) into root: write(folder) fills a
    sibling folder, the backbone files are copied in, and the folder is renamed into place,
    replacing an earlier set there (one holding marker), so an interrupted run never leaves a set
    that looks complete."""
    root, backbones = Path(root), Path(backbones)
    if root.exists() and any(root.iterdir()) and not (root / marker).is_file():
        raise FileExistsError(f"{root} exists and is not a {kind} set: refusing to replace it")
    missing = [f for f in backbone_files if not (backbones / f).is_file()]
    if missing:
        raise FileNotFoundError(f"no tiny backbones in {backbones} (missing {missing[0]}): "
                                f"run  python -m data.backbones --out {backbones}")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would leave the set unreadable to others
    try:
        write(tmp)
        for f in backbone_files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(backbones / f, tmp / f)
        if root.exists():  # move the old set aside first: rename cannot replace a full folder
            old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(root, old)
            shutil.rmtree(old)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def is_complete(root) -> bool:
    return all((Path(root) / f).is_file() for f in ("problems.json", "pid_splits.json", *BACKBONE_FILES))


def ensure(root="data/shapes", **kwargs) -> Path:
    """The set at root, generated first if it is not there (build_dataset calls this)."""
    root = Path(root)
    if not is_complete(root):
        generate(root, **kwargs)
    return root


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--root", default="data/shapes", help="output folder (replaced if it holds a set)")
    ap.add_argument("--n", type=int, default=N_PROBLEMS, help="number of problems (at least 54)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbones", default=str(BACKBONES), help="folder of the tiny backbones to copy")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    generate(args.root, args.n, args.seed, args.backbones)


if __name__ == "__main__":
    main()
