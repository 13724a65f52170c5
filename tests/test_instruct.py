"""data/instruct.py: Alpaca and LLaVA-Instruct read as the recipe and as multi-turn chats, their bad
input named, and the held-out text score."""
import json

import pytest

import data
from data import instruct
from data.batching import IGNORE_INDEX, Sample
from data.scienceqa import DataError
from tests.helpers import R, edit_json, write_png


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


def test_text_evaluation_exact_match(tmp_path, shapes_tok):
    entries = [{"instruction": "What was the weather?", "input": "It was rainy.", "output": "Rainy."},
               {"instruction": "Where does Tom live?", "input": "", "output": "Pine City."},
               {"instruction": "Which shape has 3 sides?", "input": "", "output": "Triangle."}]
    (tmp_path / "alpaca_test.json").write_text(json.dumps(entries))
    task = data.evaluation("alpaca", str(tmp_path), "test", shapes_tok)
    assert task.dataset.samples[1].turns[0][0] == "Instruction: Where does Tom live? \nResponse:"
    result, files = task.score({"alpaca_test_0": "rainy", "alpaca_test_1": " Pine  city.", "alpaca_test_2": "Square."})
    assert result == {"dataset": "alpaca", "split": "test", "n": 3, "exact": 66.67}  # 2 of 3
    assert [p["right"] for p in files["preds.json"].values()] == [True, True, False]
    with pytest.raises(DataError, match="no response for 1 of the 3"):
        task.score({"alpaca_test_0": "x", "alpaca_test_1": "y"})
