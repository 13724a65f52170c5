"""data/: ScienceQA prompts, tokenisation and masking, batching, the sampler, instruction data (the
accuracy table and every bad input named: test_scienceqa.py). Expected strings and numbers are written out by
hand here, never computed with the code under test."""
import io
import json

import pytest
import sentencepiece as spm
import torch
from PIL import Image
from torch.utils.data import DataLoader

import data
from data import instruct, scienceqa
from data.batching import (IGNORE_INDEX, Collator, LengthGroupedBatchSampler, Sample, encode_turns)
from data.scienceqa import build_prompt
from model import Tokenizer

R = 16  # image side in these tests: small and fast

# ----------------------------------------------------------------------------- fixtures

CORPUS = """Question: Which material is this?
Context: Look at the picture. A window.
Options: (A) wood (B) glass (C) rubber
Response:The answer is B. BECAUSE: A material is a type of matter. Glass is clear.
Instruction: Give three tips about sleep. Describe the image. What color? How many?
The cat is blue. A red square. Red. Two. Tom has a dog. Who has a dog? What color is the square?
Colors are everywhere. Look closely. The square is red. The picture shows a map.
Which word is a noun? Natural science, social science and language science."""


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A real sentencepiece model with LLaMA's settings that matter here: ids unk 0, BOS 1,
    EOS 2; identity normalisation and no whitespace collapsing, so newlines and double spaces
    survive a round trip (byte fallback covers characters it has not seen)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 3), model_writer=buf, vocab_size=400,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return Tokenizer(path)


def problem(question, choices, answer, hint="", image=None, subject="natural science", grade="grade3",
            lecture="", solution="", split="train"):
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": grade, "subject": subject, "topic": "t", "category": "c",
            "skill": "s", "lecture": lecture, "solution": solution, "split": split}


# (pid, subject, hint, has image, grade, answer, n choices) of the test split, for the table
TEST_ROWS = [
    ("t1", "natural science", "", True, 2, 0, 3), ("t2", "natural science", "h", False, 8, 1, 2),
    ("t3", "natural science", "", True, 9, 1, 2), ("t4", "natural science", "h", True, 4, 0, 2),
    ("t5", "natural science", "", False, 3, 2, 3), ("t6", "social science", "h", True, 5, 2, 3),
    ("t7", "social science", "h", False, 11, 0, 2), ("t8", "social science", "", False, 6, 1, 2),
    ("t9", "language science", "", False, 7, 1, 2), ("t10", "language science", "h", False, 12, 0, 2),
    ("t11", "language science", "", True, 10, 0, 2), ("t12", "language science", "", False, 1, 1, 2),
]


def write_png(path, rgb, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


def write_release(root):
    """A mini ScienceQA in the official layout: image and text-only problems, captions."""
    problems = {
        "101": problem("What  color is the square?", ["red", "blue"], 0, image="image.png",
                       lecture="Colors  are everywhere.\nLook closely.", solution="The square is red."),
        "102": problem("Who has a dog?", ["Tom", "Ana", "Leo"], 0, hint="Tom has a dog.",
                       subject="social science", grade="grade8"),
        "103": problem("Which place is on the map?", ["Oak", "Pine", "Elm", "Ash"], 3, image="image.png",
                       hint="The picture shows a map.", subject="language science", grade="grade10",
                       lecture="Maps show places.", solution="The map shows Ash."),
        "104": problem("Which word is a noun?", ["run", "dog"], 1, lecture="A noun names a thing.",
                       solution="Dog names an animal.\nSo dog is a noun.", subject="language science"),
        "201": problem("What shape is it?", ["circle", "square"], 1, image="image.png", split="val",
                       solution="It has four sides."),
    }
    for pid, subject, hint, img, grade, answer, n in TEST_ROWS:
        problems[pid] = problem(f"Question {pid}?", [f"c{i}" for i in range(n)], answer, hint=hint,
                                image="image.png" if img else None, subject=subject,
                                grade=f"grade{grade}", split="test")
    splits = {"train": ["101", "102", "103", "104"], "val": ["201"], "test": [r[0] for r in TEST_ROWS],
              "trainval": ["101", "102", "103", "104", "201"], "minival": ["201"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems, indent=1))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    (root / "captions.json").write_text(json.dumps({"captions": {"101": "A red square.", "103": "A map."}}))
    for pid, p in problems.items():
        if p["image"]:
            write_png(root / "images" / p["split"] / pid / "image.png", (200, 30 * len(pid), 40))
    return root


@pytest.fixture
def sqa(tmp_path):
    return write_release(tmp_path / "scienceqa")


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


# ----------------------------------------------------------------------------- prompt formats

# newlines and doubled / quadrupled spaces in lecture and solution, a doubled space in the hint
P = problem("Which  material is this?", ["wood", "glass", "rubber"], 1, hint="Look at the  picture.",
            lecture="A material is a type of matter.\nWood, glass, and  rubber are    materials.",
            solution="Glass is clear.\n\nSo the answer is glass.")
P["caption"] = "A window."

QCM = "Question: Which material is this?\nContext: Look at the picture.\nOptions: (A) wood (B) glass (C) rubber\nResponse:"
LEC = "A material is a type of matter.\\nWood, glass, and rubber are  materials."  # one collapse pass: 4 -> 2
SOL = "Glass is clear.\\n\\nSo the answer is glass."


@pytest.mark.parametrize("fmt, caption, prompt, target", [
    ("QCM-ALE", False, QCM, "The answer is B. BECAUSE: " + LEC + " " + SOL),
    ("QCM-A", False, QCM, "The answer is B."),
    ("CQM-A", False,
     "Context: Look at the picture.\nQuestion: Which material is this?\nOptions: (A) wood (B) glass (C) rubber\nResponse:",
     "The answer is B."),
    ("CQM-A", True,
     "Context: Look at the picture. A window.\nQuestion: Which material is this?\nOptions: (A) wood (B) glass (C) rubber\nResponse:",
     "The answer is B."),
    ("QCM-ALE", True,
     "Question: Which material is this?\nContext: Look at the picture. A window.\nOptions: (A) wood (B) glass (C) rubber\nResponse:",
     "The answer is B. BECAUSE: A material is a type of matter.\\nWood, glass, and rubber are  materials. Glass is clear.\\n\\nSo the answer is glass."),
    ("QCM-LEA", False, QCM,
     "A material is a type of matter.\\nWood, glass, and rubber are  materials. Glass is clear.\\n\\nSo the answer is glass. The answer is B."),
    ("QCM-LA", False, QCM, "A material is a type of matter.\\nWood, glass, and rubber are  materials. The answer is B."),
    ("QCM-EA", False, QCM, "Glass is clear.\\n\\nSo the answer is glass. The answer is B."),
    ("QCM-ELA", False, QCM, SOL + " " + LEC + " The answer is B."),
    ("QCM-AEL", False, QCM, "The answer is B. BECAUSE: " + SOL + " " + LEC),
    # the reference's AL gives the solution and AE the lecture (its letters are swapped)
    ("QCM-AL", False, QCM, "The answer is B. BECAUSE: Glass is clear.\\n\\nSo the answer is glass."),
    ("QCM-AE", False, QCM, "The answer is B. BECAUSE: " + LEC),
    ("QCML-A", False,
     "Question: Which material is this?\nContext: Look at the picture.\nOptions: (A) wood (B) glass (C) rubber\n"
     "BECAUSE: A material is a type of matter.\\nWood, glass, and rubber are  materials.\nResponse:",
     "The answer is B."),
    ("QCLEM-A", False,
     "Question: Which material is this?\nContext: Look at the picture.\nBECAUSE: " + LEC + " " + SOL
     + "\nOptions: (A) wood (B) glass (C) rubber\nResponse:", "The answer is B."),
    ("QCMA-EA", False,
     "Question: Which material is this?\nContext: Look at the picture.\nOptions: (A) wood (B) glass (C) rubber\n"
     "Answer: The answer is B.\nResponse:", SOL + " The answer is B."),
])
def test_prompt_formats(fmt, caption, prompt, target):
    assert build_prompt(P, fmt, use_caption=caption) == (prompt, target)


def test_prompt_edge_cases():
    q = problem("  Is it wet?  ", ["yes", "no"], 0, hint="   ")  # blank hint, no lecture/solution
    q["caption"] = ""
    # "Question: " + "  Is": three spaces, and one collapse pass leaves two
    assert build_prompt(q, "QCM-ALE", use_caption=True) == (
        "Question:  Is it wet? \nContext: N/A\nOptions: (A) yes (B) no\nResponse:",
        "The answer is A. BECAUSE:")  # LaVIN keeps the dangling BECAUSE: (its clean-up is dead code)
    with pytest.raises(ValueError, match="QCM-XYZ"):
        build_prompt(q, "QCM-XYZ")
    assert len(scienceqa.PROMPT_FORMATS) == 81


def test_captions_on_and_off_from_the_release(sqa):
    off = {s.pid: s for s in scienceqa.load_samples(sqa, "train")}
    on = {s.pid: s for s in scienceqa.load_samples(sqa, "train", use_caption=True)}
    assert off["101"].turns == ((
        "Question: What color is the square?\nContext: N/A\nOptions: (A) red (B) blue\nResponse:",
        "The answer is A. BECAUSE: Colors are everywhere.\\nLook closely. The square is red."),)
    assert on["101"].turns[0][0] == "Question: What color is the square?\nContext: A red square.\nOptions: (A) red (B) blue\nResponse:"
    assert on["103"].turns[0][0].split("\n")[1] == "Context: The picture shows a map. A map."
    assert off["102"].turns[0] == (
        "Question: Who has a dog?\nContext: Tom has a dog.\nOptions: (A) Tom (B) Ana (C) Leo\nResponse:",
        "The answer is A. BECAUSE:")
    assert off["101"].image == str(sqa / "images" / "train" / "101" / "image.png")
    assert off["102"].image is None
    # trainval/minival hold val problems: their images live under images/val
    mv = scienceqa.load_samples(sqa, "minival")
    assert mv[0].image == str(sqa / "images" / "val" / "201" / "image.png")
    assert [s.pid for s in scienceqa.load_samples(sqa, "trainval")] == ["101", "102", "103", "104", "201"]


# ----------------------------------------------------------------------------- tokens and labels

def test_loss_only_on_the_target(tok, sqa):
    ds = data.build_dataset("scienceqa", str(sqa), "train", tok, resolution=R)
    for i, s in enumerate(ds.samples):
        (prompt, target), = s.turns
        item = ds[i]
        tokens, labels = item["tokens"], item["labels"]
        assert tokens.tolist() == tok.encode(prompt + target, bos=True, eos=True)  # one string
        assert tokens[0] == 1 and tokens[-1] == 2 and labels.shape == tokens.shape
        on = labels != IGNORE_INDEX
        assert torch.equal(labels[on], tokens[on])  # aligned, unshifted
        assert int((~on).sum()) == len(tok.encode(prompt, bos=True, eos=False))
        assert bool(on[-1])  # EOS carries loss: the model learns to stop
        assert tok.decode(tokens[on].tolist()) == target
        assert tok.decode(tokens[~on].tolist()) == prompt


def test_padding_batch_fields_and_images(tok, sqa):
    import clip

    ds = data.build_dataset("scienceqa", str(sqa), "train", tok, resolution=R)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=ds.collate)))
    lengths = [len(tok.encode("".join(s.turns[0]), bos=True, eos=True)) for s in ds.samples]
    B, T = 4, max(lengths)
    assert batch["tokens"].shape == (B, T) and batch["tokens"].dtype == torch.long
    assert batch["labels"].shape == (B, T) and batch["labels"].dtype == torch.long
    assert batch["lengths"].tolist() == lengths
    assert batch["pids"] == ["101", "102", "103", "104"]
    assert batch["img_indicator"].tolist() == [1, 0, 1, 0]
    for b, n in enumerate(lengths):
        assert (batch["tokens"][b, n:] == 0).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
    assert batch["images"].shape == (B, 3, R, R) and batch["images"].dtype == torch.float32
    assert (batch["images"][[1, 3]] == 0).all()
    expected = clip.preprocess(clip.load_image(sqa / "images/train/103/image.png"), mode="lavin", resolution=R)
    assert torch.equal(batch["images"][2], expected)
    # an all-text batch still has images of the configured size
    text_only = Collator(resolution=R)([ds[1], ds[3]])
    assert text_only["images"].shape == (2, 3, R, R) and text_only["img_indicator"].tolist() == [0, 0]


def test_truncation_is_counted_and_reported(tok, sqa):
    full = [tok.encode("".join(s.turns[0]), bos=True, eos=True) for s in scienceqa.load_samples(sqa, "train")]
    lengths = sorted(len(t) for t in full)
    # the cap exactly fits: nothing cut, nothing said
    ds = data.build_dataset("scienceqa", str(sqa), "train", tok, max_seq_len=lengths[-1] + 8, reserve=8)
    assert ds.n_truncated == 0 and ds.lengths == [len(t) for t in full]
    # one more reserved position cuts exactly the samples of the maximal length
    n_max = lengths.count(lengths[-1])
    with pytest.warns(UserWarning, match=f"{n_max} of 4 samples"):
        ds = data.build_dataset("scienceqa", str(sqa), "train", tok, max_seq_len=lengths[-1] + 8, reserve=9)
    assert ds.n_truncated == n_max
    # a cap in the middle: every longer sample cut to the cap, the others untouched
    reserve, cap = 8, lengths[1] + 8
    n_long = sum(n > lengths[1] for n in lengths)
    assert 0 < n_long < 4
    with pytest.warns(UserWarning, match=f"{n_long} of 4 samples"):
        ds = data.build_dataset("scienceqa", str(sqa), "train", tok, max_seq_len=cap, reserve=reserve)
    assert ds.n_truncated == n_long and max(ds.lengths) == cap - reserve
    for i, t in enumerate(full):
        assert ds[i]["tokens"].tolist() == t[:cap - reserve]
        assert ds[i]["labels"].shape == ds[i]["tokens"].shape


def test_multiturn_encoding(tok):
    turns = (("Instruction: What color?\nResponse:", "Red."), ("Instruction: How many?\nResponse:", "Two."))
    tokens, labels, cut = encode_turns(tok, turns)
    first = tok.encode("Instruction: What color?\nResponse:Red.", bos=True, eos=True)
    second = tok.encode("Instruction: How many?\nResponse:Two.", bos=False, eos=True)
    assert tokens == first + second and not cut
    on = [t for t, lab in zip(tokens, labels) if lab != IGNORE_INDEX]
    assert on.count(2) == 2  # EOS after each answer carries loss
    n1 = len(tok.encode("Instruction: What color?\nResponse:", bos=True, eos=False))
    n2 = len(tok.encode("Instruction: How many?\nResponse:", bos=False, eos=False))
    assert labels == [IGNORE_INDEX] * n1 + first[n1:] + [IGNORE_INDEX] * n2 + second[n2:]
    assert tok.decode(first[n1:]) == "Red." and tok.decode(second[n2:]) == "Two."


# ----------------------------------------------------------------------------- sampler

def rank_batches(lengths, world, epoch=0, **kw):
    out = []
    for r in range(world):
        s = LengthGroupedBatchSampler(lengths, 4, rank=r, world_size=world, seed=7, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(s) == len(out[-1])
    return out


def test_sampler_ranks_are_disjoint_and_cover_everything():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (102,), generator=g).tolist()
    per_rank = rank_batches(lengths, 3)
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    for step in zip(*per_rank):
        assert len({len(b) for b in step}) == 1  # same batch size at each step
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(102))  # disjoint, complete
    # 103 is not a multiple of 3: one index repeats so that the shares stay equal
    flat = [i for batches in rank_batches(lengths + [9], 3) for b in batches for i in b]
    assert set(flat) == set(range(103)) and len(flat) == 105
    # drop_last: only full batches
    dl = rank_batches(lengths, 3, drop_last=True)
    assert all(len(b) == 4 for batches in dl for b in batches) and len(dl[0]) == 102 // 12


def test_sampler_is_deterministic_per_epoch_and_groups_lengths():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 500, (400,), generator=g).tolist()
    assert rank_batches(lengths, 2, epoch=3) == rank_batches(lengths, 2, epoch=3)
    assert rank_batches(lengths, 2, epoch=3) != rank_batches(lengths, 2, epoch=4)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = rank_batches(lengths, 1, mega_batches=10)[0]
    plain = rank_batches(lengths, 1, group_by_length=False)[0]
    assert sorted(i for b in plain for i in b) == list(range(400))
    assert padded(grouped) < 0.8 * padded(plain)
    assert max(lengths) in [lengths[i] for i in grouped[0]]  # the longest batch comes first


# ----------------------------------------------------------------------------- instruction data

def write_instruct(tmp_path):
    root, coco = tmp_path / "instruct", tmp_path / "coco"
    root.mkdir(parents=True)
    for n in (1, 2):
        write_png(coco / f"COCO_train2014_00000000000{n}.jpg", (10 * n, 90, 90))
    files = {
        "alpaca_data.json": [{"instruction": "Give  three tips.", "input": "About sleep.", "output": "1. Sleep early."},
                             {"instruction": "Say hi.", "input": "", "output": " Hi!"}],
        "complex_reasoning_77k.json": [{"id": "c1", "image": "000000000001.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is unusual?"}, {"from": "gpt", "value": "The cat  is blue."}]}],
        "detail_23k.json": [{"id": "d1", "image": "000000000002.jpg", "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A red square."}]}],
        "conversation_58k.json": [{"id": "v1", "image": "000000000001.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Two."}]}],
    }
    for name, obj in files.items():
        (root / name).write_text(json.dumps(obj))
    return root, coco


def test_instruct_recipe(tmp_path):
    root, coco = write_instruct(tmp_path)
    samples = instruct.load_samples(root, coco)
    c1, c2 = str(coco / "COCO_train2014_000000000001.jpg"), str(coco / "COCO_train2014_000000000002.jpg")
    assert samples == [
        Sample("alpaca_0", (("Instruction: Give three tips. About sleep.\nResponse:", "1. Sleep early."),)),
        Sample("alpaca_1", (("Instruction: Say hi. \nResponse:", " Hi!"),)),
        Sample("complex_reasoning_77k_c1_0", (("Instruction: What is unusual?\nResponse:", "The cat  is blue."),), c1),
        Sample("detail_23k_d1_0", (("Instruction: Describe the image.\nResponse:", "A red square."),), c2),
        Sample("conversation_58k_v1_0", (("Instruction: What color?\nResponse:", "Red."),), c1),
        Sample("conversation_58k_v1_1", (("Instruction: How many?\nResponse:", "Two."),), c1),
    ]


def test_instruct_multiturn_dataset(tmp_path, tok):
    root, coco = write_instruct(tmp_path)
    ds = data.build_dataset("instruct", str(root), "train", tok, coco_root=str(coco),
                            instruct_mode="multiturn", resolution=R)
    assert [s.pid for s in ds.samples] == ["alpaca_0", "alpaca_1", "complex_reasoning_77k_c1",
                                           "detail_23k_d1", "conversation_58k_v1"]
    conv = ds.samples[-1]
    assert conv.turns == (("Instruction: What color?\nResponse:", "Red."), ("Instruction: How many?\nResponse:", "Two."))
    batch = ds.collate([ds[i] for i in range(len(ds))])
    assert batch["img_indicator"].tolist() == [0, 0, 1, 1, 1]
    labels, tokens = batch["labels"][-1], batch["tokens"][-1]
    on = labels != IGNORE_INDEX
    pieces = tok.decode(tokens[on].tolist())
    assert pieces == "Red.Two." and int((tokens[on] == 2).sum()) == 2
