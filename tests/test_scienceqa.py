"""data/scienceqa.py: the prompt formats written out by hand (never computed with the code under
test), captions, and every bad input of the release named (the release: helpers.write_release)."""
import pytest

from data import scienceqa
from data.scienceqa import DataError, build_prompt
from tests.helpers import edit_json, problem


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


# ----------------------------------------------------------------------------- bad input

def open_train(root, **kw):
    return scienceqa.load_samples(root, "train", **kw)


def test_missing_release_files(sqa):
    (sqa / "pid_splits.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"missing pid_splits.json in {sqa}"):
        open_train(sqa)
    (sqa / "problems.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing problems.json"):
        open_train(sqa)


def test_malformed_json_names_file_and_position(sqa):
    (sqa / "problems.json").write_text('{\n "101": {"question": "x",\n   "choices": [1, 2,]}\n}')
    with pytest.raises(DataError, match=r"problems.json: malformed JSON at line 3 column"):
        open_train(sqa)


def test_unknown_split_lists_available(sqa):
    with pytest.raises(DataError, match="split 'tran' .* available: minival, test, train, trainval, val"):
        scienceqa.load_samples(sqa, "tran")


def test_pid_missing_from_problems(sqa):
    edit_json(sqa / "pid_splits.json", lambda s: s["train"].append("999"))
    with pytest.raises(DataError, match="pid 999 is listed in split 'train'"):
        open_train(sqa)


def test_answer_outside_choices(sqa):
    edit_json(sqa / "problems.json", lambda p: p["102"].update(answer=3))
    with pytest.raises(DataError, match="problem 102: answer index 3 is outside its 3 choices"):
        open_train(sqa)


def test_missing_image_names_pid_and_path(sqa):
    (sqa / "images/train/103/image.png").unlink()
    with pytest.raises(DataError, match=r"problem 103 has an image but .*images/train/103/image.png does not exist"):
        open_train(sqa)


def test_missing_captions_and_fields(sqa):
    (sqa / "captions.json").unlink()
    open_train(sqa)  # captions are optional without use_caption
    with pytest.raises(FileNotFoundError, match="captions.json"):
        open_train(sqa, use_caption=True)
    edit_json(sqa / "problems.json", lambda p: p["104"].pop("lecture"))
    with pytest.raises(DataError, match="problem 104 has no 'lecture'"):
        open_train(sqa)
