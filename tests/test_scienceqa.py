"""The ScienceQA release as scored and as refused: the accuracy table by hand, and every bad input
named (the release written by test_data.py's fixtures)."""
import importlib.machinery
import json
import pathlib
import sys
import types

import pytest

import data
from data import instruct, scienceqa, table
from data.scienceqa import DataError
from tests.test_data import TEST_ROWS, R, edit_json, write_instruct, write_release
from tests.test_data import sqa, tok  # noqa: F401  (the fixtures)


# ----------------------------------------------------------------------------- accuracy table

# t1 ok, t2 wrong, t3 "B" with nothing after it: no match, t4 index, t5 ok, t6 index, t7 no answer,
# t8 ok, t9 two answers: the first counts, t10 "E" with 2 choices, t11 ok, t12 index out of range
PREDS = {"t1": "The answer is A.", "t2": "The answer is A.", "t3": "The answer is B", "t4": 0,
         "t5": "The answer is C. BECAUSE: x", "t6": 2, "t7": "I think it is B.", "t8": "The answer is B.",
         "t9": "The answer is B.\nThe answer is A.", "t10": "The answer is E.", "t11": "The answer is A.",
         "t12": 7}
# right: t1 t4 t5 t6 t8 t9 t11.  NAT t1-t5: 3/5   SOC t6-t8: 2/3   LAN t9-t12: 2/4
# TXT (hint) t2 t4 t6 t7 t10: 2/5   IMG t1 t3 t4 t6 t11: 4/5   NO t5 t8 t9 t12: 3/4
# G1-6 t1 t4 t5 t6 t8 t12: 5/6   G7-12 t2 t3 t7 t9 t10 t11: 2/6   Avg 7/12
EXPECTED = {"NAT": 60.0, "SOC": 66.67, "LAN": 50.0, "TXT": 40.0, "IMG": 80.0, "NO": 75.0,
            "G1-6": 83.33, "G7-12": 33.33, "Avg": 58.33}


def test_table_by_hand(sqa, tmp_path, capsys):
    (tmp_path / "outputs.json").write_text(json.dumps(PREDS))
    out = tmp_path / "res" / "results.json"
    out.parent.mkdir()
    result = table.main(["--data", str(sqa), "--split", "test", "--preds", str(tmp_path / "outputs.json"),
                         "--out", str(out)])
    assert result["acc"] == EXPECTED
    assert result["count"] == {"NAT": 5, "SOC": 3, "LAN": 4, "TXT": 5, "IMG": 5, "NO": 4, "G1-6": 6,
                               "G7-12": 6, "Avg": 12}
    assert result["unparsed"] == 4 and result["n"] == 12
    assert json.loads(out.read_text())["acc"] == EXPECTED
    assert json.loads((tmp_path / "res" / "preds.json").read_text()) == {
        "t1": 0, "t2": 0, "t3": -1, "t4": 0, "t5": 2, "t6": 2, "t7": -1, "t8": 1, "t9": 1, "t10": -1,
        "t11": 0, "t12": -1}
    printed = capsys.readouterr().out
    assert "4 answers unparsed" in printed and "58.33" in printed and "G7-12" in printed


def test_table_errors(sqa, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({k: v for k, v in PREDS.items() if k != "t5"}))
    with pytest.raises(DataError, match="no prediction for 1 of the 12 problems.*t5"):
        table.main(["--data", str(sqa), "--preds", str(tmp_path / "p.json")])
    assert table.parse_answer("The answer is C.", 2) == -1 and table.parse_answer("The answer is C!", 3) == 2


def test_a_negative_choice_index_is_unparsed_never_kept(sqa, tmp_path):
    """A preds.json of indices holding -2 (Python would read it from the end of the choices):
    unparsed, written as -1, counted with the unparsed."""
    (tmp_path / "p.json").write_text(json.dumps({**PREDS, "t4": -2, "t6": -1}))
    result = table.main(["--data", str(sqa), "--preds", str(tmp_path / "p.json"), "--out", str(tmp_path / "r.json")])
    assert result["unparsed"] == 6 and result["acc"]["Avg"] == 41.67  # t4 and t6 were right: 5 of 12
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert (preds["t4"], preds["t6"]) == (-1, -1)


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


def test_unreadable_image_named_when_loaded(sqa, tok):
    path = sqa / "images/train/103/image.png"
    path.write_bytes(path.read_bytes()[:30])  # truncated PNG: exists, so opening the set works
    ds = data.build_dataset("scienceqa", str(sqa), "train", tok, resolution=R)
    ds[1]  # text-only samples are unaffected
    with pytest.raises(RuntimeError, match=r"sample 103: cannot load image .*103/image.png"):
        ds[2]


def test_bad_instruction_data(tmp_path):
    root, coco = write_instruct(tmp_path)
    conv = root / "conversation_58k.json"
    good = conv.read_text()
    edit_json(conv, lambda d: d[0]["conversations"].reverse())
    with pytest.raises(DataError, match="conversation_58k.json: entry v1: turn 0 should be"):
        instruct.load_samples(root, coco)
    conv.write_text(good)
    edit_json(root / "alpaca_data.json", lambda d: d[1].pop("output"))
    with pytest.raises(DataError, match="alpaca_data.json: entry #1 needs"):
        instruct.load_samples(root, coco)
    root, coco = write_instruct(tmp_path / "b")
    (coco / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(DataError, match="detail_23k.json: entry d1: image .*COCO_train2014_000000000002.jpg"):
        instruct.load_samples(root, coco)
    (root / "detail_23k.json").unlink()
    (root / "alpaca_data.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing alpaca_data.json, detail_23k.json"):
        instruct.load_samples(root, coco)
    with pytest.raises(ValueError, match="unknown instruction mode"):
        instruct.load_samples(root, coco, mode="chat")


def test_shapes_reads_the_scienceqa_layout(tmp_path, tok, monkeypatch):
    root = write_release(tmp_path / "shapes")
    ds = data.build_dataset("shapes", str(root), "val", tok, resolution=R)
    assert [s.pid for s in ds.samples] == ["201"]
    # an absent set: a folder of the user's is an error (a typo must not write a new set there) ...
    with pytest.raises(FileNotFoundError, match=f"no shapes set in {tmp_path / 'none'}: .*python -m data.shapes"):
        data.build_dataset("shapes", str(tmp_path / "none"), "train", tok)
    assert not (tmp_path / "none").exists()
    # ... the default folder is generated by data.shapes.ensure when it exists, else a clear instruction
    monkeypatch.chdir(tmp_path)  # the default, data/shapes, is relative
    fake = types.ModuleType("data.shapes")
    fake.__spec__ = importlib.machinery.ModuleSpec("data.shapes", None)
    monkeypatch.setitem(sys.modules, "data.shapes", fake)
    with pytest.raises(FileNotFoundError, match="python -m data.shapes"):
        data.build_dataset("shapes", None, "train", tok)
    fake.ensure = lambda root: write_release(pathlib.Path(root))
    ds = data.build_dataset("shapes", None, "test", tok, resolution=R)
    assert len(ds) == len(TEST_ROWS) and (tmp_path / "data" / "shapes" / "problems.json").is_file()
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_dataset("imagenet", None, "train", tok)
