"""data/shapes.py, the synthetic `shapes` set: ScienceQA's layout, determinism, answers that need the
picture, a copy of the shipped backbones (data/backbones.py's tests: test_backbones.py)."""
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import shapes
from tests.helpers import N, file_bytes, read


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "set"
    root.mkdir()
    shapes.write_problems(root, N, seed=0)
    return root


def test_release_layout(small_set):
    problems, splits = read(small_set, "problems.json"), read(small_set, "pid_splits.json")
    captions = read(small_set, "captions.json")["captions"]
    assert set(splits) == {"train", "val", "test", "trainval", "minival", "minitest"}
    assert splits["trainval"] == splits["train"] + splits["val"]
    assert set(splits["minival"]) <= set(splits["val"]) and set(splits["minitest"]) <= set(splits["test"])
    assert sorted(splits["train"] + splits["val"] + splits["test"], key=int) == list(problems)
    keys = {"question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic",
            "category", "skill", "lecture", "solution", "split"}
    for split in ("train", "val", "test"):
        for pid in splits[split]:
            p = problems[pid]
            assert set(p) == keys and p["split"] == split
            assert 0 <= p["answer"] < len(p["choices"]) and len(set(p["choices"])) == len(p["choices"])
            assert p["grade"] in {f"grade{g}" for g in range(1, 13)}
            assert p["subject"] in {"natural science", "social science", "language science"}
            image = small_set / "images" / split / pid / "image.png"
            assert image.is_file() == (p["image"] == "image.png") == (pid in captions)
            if p["image"]:
                assert Image.open(image).size == (shapes.SIZE, shapes.SIZE) and not p["hint"]
    assert any("\n" in p["lecture"] for p in problems.values())
    assert any("\n" in p["solution"] for p in problems.values())


COLUMNS = {  # as data/table.py defines them (checked against it below when it is there)
    "NAT": lambda p: p["subject"] == "natural science", "SOC": lambda p: p["subject"] == "social science",
    "LAN": lambda p: p["subject"] == "language science", "TXT": lambda p: bool(p["hint"]),
    "IMG": lambda p: bool(p["image"]), "NO": lambda p: not p["hint"] and not p["image"],
    "G1-6": lambda p: int(p["grade"][5:]) <= 6, "G7-12": lambda p: int(p["grade"][5:]) >= 7,
}


def test_every_table_column_in_every_split(small_set):
    problems, splits = read(small_set, "problems.json"), read(small_set, "pid_splits.json")
    try:
        from data.table import COLUMNS as table_columns
        columns = {name: test for name, test in table_columns if name != "Avg"}
        assert set(columns) == set(COLUMNS)
    except ImportError:
        columns = COLUMNS
    for split in ("train", "val", "test"):
        for name, test in columns.items():
            assert any(test(problems[pid]) for pid in splits[split]), f"no {name} problem in {split}"


def test_same_seed_same_bytes_other_seed_other_set(tmp_path, small_set):
    again, other = tmp_path / "again", tmp_path / "other"
    again.mkdir(), other.mkdir()
    shapes.write_problems(again, N, seed=0)
    shapes.write_problems(other, N, seed=1)
    assert file_bytes(again) == file_bytes(small_set)
    assert (other / "problems.json").read_bytes() != (small_set / "problems.json").read_bytes()


def test_set_holds_a_copy_of_the_shipped_backbones(full_small):
    assert {f: (full_small / f).read_bytes() for f in shapes.BACKBONE_FILES} == \
        {f: (shapes.BACKBONES / f).read_bytes() for f in shapes.BACKBONE_FILES}


def blobs(image: Image.Image) -> list:
    """Connected non-white regions as (pixel count, mean colour), 4-neighbour flood fill."""
    a = np.asarray(image).astype(int)
    ink, seen, out = (a < 250).any(-1), np.zeros(a.shape[:2], bool), []
    for y0, x0 in zip(*np.nonzero(ink)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v < a.shape[0] and 0 <= u < a.shape[1] and ink[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        ys, xs = zip(*pixels)
        out.append((len(pixels), tuple(a[list(ys), list(xs)].mean(0)), np.mean(xs), np.mean(ys),
                    (min(xs), min(ys), max(xs), max(ys))))
    return out


def shape_of(blob) -> str:
    """Which of shapes.SHAPES a blob is, from how much of its bounding box it fills and where its
    mass sits: a square fills it, a circle pi/4, a triangle and a diamond half (the triangle's
    weight low, pointing up), a star about a third."""
    n, _, _, my, (x0, y0, x1, y1) = blob
    fill = n / ((x1 - x0 + 1) * (y1 - y0 + 1))
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    if fill > 0.455:
        return "triangle" if (my - (y0 + y1) / 2) / (y1 - y0 + 1) > 0.08 else "diamond"
    return "star"


def test_shape_of_reads_every_shape():
    for shape in shapes.SHAPES:
        for r in (10, 14):
            found = blobs(shapes.render([(shape, "red", 32, 32, r)]))
            assert len(found) == 1 and shape_of(found[0]) == shape, (shape, r)


def test_image_answers_are_in_the_picture_not_the_text(tmp_path):
    shapes.write_problems(tmp_path, 400, seed=3)
    problems = read(tmp_path, "problems.json")
    checked = Counter()
    by_question = {}
    for pid, p in problems.items():
        if not p["image"]:
            continue
        answer = p["choices"][p["answer"]]
        by_question.setdefault(p["question"], []).append(answer)
        found = blobs(Image.open(tmp_path / "images" / p["split"] / pid / "image.png").convert("RGB"))
        if p["question"] == "What color is the shape?":
            rgb = max(found)[1]
            assert min(shapes.COLORS, key=lambda c: np.abs(np.subtract(shapes.COLORS[c], rgb)).sum()) == answer
            checked["color"] += 1
        elif p["question"].startswith("How many"):
            assert len(found) == int(answer)
            checked["count"] += 1
        elif p["question"].startswith("Where is the"):
            (blob,) = found
            x, y = blob[2], blob[3]  # its centre of mass
            at = {"left": x < 24, "right": x > 40, "top": y < 24, "bottom": y > 40}
            assert at[answer] and sum(at.values()) == 1, pid  # on the answer's side, and no other
            assert shape_of(blob) == p["question"].split()[-1].rstrip("?"), pid  # the shape asked about
            checked["side"] += 1
    assert min(checked.values()) >= 5 and len(checked) == 3
    # No question text decides its answer: each one asked 5+ times got several different answers.
    assert all(len(set(answers)) > 1 for answers in by_question.values() if len(answers) >= 5)
    # The right letter is spread over the positions: chance is the best a text-only reader can do.
    letters = Counter(p["answer"] for p in problems.values() if p["image"])
    assert all(letters[i] > 0.15 * sum(letters.values()) for i in range(3))


def test_text_answers_are_in_the_hint_or_are_facts(small_set):
    def said(word, text):
        return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None

    for p in read(small_set, "problems.json").values():
        answer, others = p["choices"][p["answer"]], [c for i, c in enumerate(p["choices"]) if i != p["answer"]]
        if p["hint"]:  # the answer is stated, and no other option is
            assert said(answer, p["hint"])
            assert not any(said(c, p["hint"]) for c in others)
        elif not p["image"]:
            assert said(answer, p["solution"])


def test_reader_loads_every_split(small_set):
    scienceqa = pytest.importorskip("data.scienceqa")
    for split in ("train", "val", "test", "trainval", "minival", "minitest"):
        samples = scienceqa.load_samples(str(small_set), split)
        assert len(samples) == len(read(small_set, "pid_splits.json")[split])
        for s in samples:
            prompt, target = s.turns[0]
            assert prompt.startswith("Question: ") and prompt.endswith("Response:")
            assert target.startswith("The answer is ") and "\n" not in target
            assert (s.image is not None) == (read(small_set, "problems.json")[s.pid]["image"] is not None)


def test_build_dataset_reads_the_set_with_its_own_tokenizer(full_small):
    data = pytest.importorskip("data")
    if not hasattr(data, "build_dataset"):
        pytest.skip("data.build_dataset is not there yet")
    model_py = pytest.importorskip("model")
    tok = model_py.Tokenizer(full_small / "tokenizer.model")
    ds = data.build_dataset("shapes", str(full_small), "val", tok, image_mode="clip",
                            resolution=shapes.SIZE)
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == len(read(full_small, "pid_splits.json")["val"])
    assert any(it["image"] is None for it in items)
    assert all(tuple(it["image"].shape) == (3, shapes.SIZE, shapes.SIZE) for it in items if it["image"] is not None)
    assert all(int(it["tokens"][0]) == tok.bos_id and int(it["tokens"][-1]) == tok.eos_id for it in items)


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes.shutil, "copyfile", crash)
    with pytest.raises(KeyboardInterrupt):
        shapes.generate(tmp_path / "set", N, quiet=True)
    assert list(tmp_path.iterdir()) == []  # neither the set nor a half-written folder


def test_ensure_builds_once_and_generate_spares_other_folders(full_small, tmp_path, monkeypatch):
    assert shapes.is_complete(full_small)
    monkeypatch.setattr(shapes, "write_problems", lambda *a, **k: pytest.fail("ensure rebuilt a complete set"))
    shapes.ensure(full_small)
    (tmp_path / "notes.txt").write_text("not a shapes set")
    with pytest.raises(FileExistsError):
        shapes.generate(tmp_path, N, quiet=True)
    assert (tmp_path / "notes.txt").read_text() == "not a shapes set"


def test_missing_backbones_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m data.backbones"):
        shapes.generate(tmp_path / "set", N, backbones=tmp_path / "none", quiet=True)
    assert not (tmp_path / "set").exists()
