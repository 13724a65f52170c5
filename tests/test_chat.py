"""The chatbot's setting: MME's reader and scores, the held-out text score, the shapes-chat set,
and a chatbot run end to end. Expected scores are computed by hand in the comments."""
import json
from pathlib import Path

import pytest
from PIL import Image

import data
import sample
import train
from config import PRESETS
from data import mme, shapes, shapes_chat
from data.batching import IGNORE_INDEX
from data.scienceqa import DataError
from model import Tokenizer
from runtime import UsageError


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(shapes.BACKBONES / "tokenizer.model")


def picture(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def write_mme(root: Path) -> Path:
    """color (side by side; b's "No" line first), artwork (images/ + questions_answers_YN/),
    code_reasoning (cognition; "No" first)."""
    qa = {("color", "a.png"): "Is it red?\tYes\nIs it blue?\tNo\n",
          ("color", "b.png"): "Is it green?\tNo\nIs it red?\tYes\n",
          ("artwork", "10002.jpg"): "Is this by Monet?\tYes\r\nIs this by Goya?\tNo\r\n",
          ("code_reasoning", "0001.png"): "Does it print 3?\tNo\nDoes it print 4?\tYes\n"}
    for (task, image), text in qa.items():
        split = task == "artwork"
        picture(root / task / ("images" if split else "") / image)
        txt = root / task / ("questions_answers_YN" if split else "") / (Path(image).stem + ".txt")
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text(text)
    return root


PREDS = {"color/a.png": ["Yes, it is.", "yes"],      # right, wrong
         "color/b.png": ["No.", "Yes"],               # both right: the answer column is read per line
         "artwork/10002.jpg": ["Maybe", "nope"],      # unparsed ("mayb"), right ("nope" starts with no)
         "code_reasoning/0001.png": ["No", " YES"]}   # both right
# color: 3 of 4 questions = 75.00, 1 of 2 images = 50.00; artwork: 50.00, 0.00; code_reasoning 100, 100
EXPECTED = {"subtasks": {"artwork": {"acc": 50.0, "acc_plus": 0.0},
                         "code_reasoning": {"acc": 100.0, "acc_plus": 100.0},
                         "color": {"acc": 75.0, "acc_plus": 50.0}},
            "perception": 175.0, "cognition": 200.0, "total": 375.0, "unparsed": 1, "questions": 8}


def test_mme_scores_by_hand(tmp_path):
    release = mme.read_release(write_mme(tmp_path / "MME"))
    assert release["color"]["b.png"]["questions"] == [("Is it green?", "no"), ("Is it red?", "yes")]
    assert mme.score(release, PREDS) == EXPECTED


@pytest.mark.parametrize("text,parsed", [("Yes", "yes"), ("no", "no"), ("No, it is red.", "no"), ("Not sure", "no"),
                                         ("It is yes", "other"), ("  YES", "yes"), ("eyes", "yes"), ("", "other")])
def test_mme_parse_reads_the_first_four_characters(text, parsed):
    assert mme.parse_yes_no(text) == parsed


def test_mme_command_line(tmp_path):
    root = write_mme(tmp_path / "MME")
    (tmp_path / "preds.json").write_text(json.dumps(PREDS))
    out = tmp_path / "res" / "results.json"
    assert mme.main(["--data", str(root), "--preds", str(tmp_path / "preds.json"), "--out", str(out)]) == EXPECTED
    assert json.loads(out.read_text()) == EXPECTED
    (tmp_path / "preds.json").write_text(json.dumps({**PREDS, "color/b.png": ["No."]}))
    with pytest.raises(DataError, match=r"1 of the 4 images have malformed responses: color/b.png should be a "
                                        r"list of 2 responses, got \['No.'\]$"):
        mme.main(["--data", str(root), "--preds", str(tmp_path / "preds.json")])


def test_mme_images_without_responses_are_counted_and_named(tmp_path):
    release = mme.read_release(write_mme(tmp_path / "MME"))
    with pytest.raises(DataError, match=r"no responses for 3 of the 4 images: artwork/10002.jpg, color/a.png, "
                                        r"color/b.png$"):
        mme.score(release, {"code_reasoning/0001.png": ["No", "Yes"]})
    many = {f"{i:02d}.png": {"questions": [("Is it red?", "yes")], "image": ""} for i in range(6)}
    with pytest.raises(DataError, match=r"no responses for 5 of the 6 images: color/01.png, color/02.png, "
                                        r"color/03.png, \.\.\.$"):
        mme.score({"color": many}, {"color/00.png": ["yes"]})


def test_mme_every_perception_subtask_counts_toward_perception():
    """MME's 10 perception and 4 cognition subtasks by their release names, every answer right
    (200 each), and one subtask of another name (in neither sum)."""
    perception = ["existence", "count", "position", "color", "OCR", "posters", "celebrity", "scene", "landmark",
                  "artwork"]
    cognition = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
    release = {name: {"1.png": {"questions": [("Q?", "yes"), ("Q?", "no")], "image": ""}}
               for name in perception + cognition + ["other"]}
    result = mme.score(release, {f"{name}/1.png": ["Yes", "No"] for name in release})
    assert (result["perception"], result["cognition"], result["total"]) == (2000.0, 800.0, 2800.0)


def test_mme_task_prompts_stop_and_scores(tmp_path, tok):
    task = mme.Evaluation(str(write_mme(tmp_path / "MME")), tok, resolution=16)
    prompts = {s.pid: s.turns[0][0] for s in task.dataset.samples}
    assert prompts["color/b.png#0"] == "Instruction: Is it green?\nResponse:" and len(prompts) == 8
    assert task.max_new_tokens == 20
    assert [task.stop(t) for t in ["", " Ye", "Yes", "No,", "No ", "Yes!", "Maybe"]] == \
        [False, False, False, True, True, True, True]
    texts = {f"{key}#{j}": r for key, rs in PREDS.items() for j, r in enumerate(rs)}
    result, files = task.score(texts)
    assert result == {"dataset": "mme", **EXPECTED} and files["preds.json"] == PREDS


def test_bad_mme_input_names_the_file(tmp_path):
    root = write_mme(tmp_path / "MME")
    (root / "color" / "a.txt").unlink()
    with pytest.raises(DataError, match=r"color/a.png: no questions for it"):
        mme.read_release(root)
    root = write_mme(tmp_path / "M2")
    (root / "color" / "b.txt").write_text("Is it green?\tNo\n")
    with pytest.raises(DataError, match=r"color/b.txt: expected two lines .* found 1"):
        mme.read_release(root)
    (root / "color" / "b.txt").write_text("Is it green?\tNo\nIs it red?\tMaybe\n")
    with pytest.raises(DataError, match=r"color/b.txt: a line should end in a tab and Yes or No"):
        mme.read_release(root)
    root = write_mme(tmp_path / "M3")
    (root / "artwork" / "images" / "10002.jpg").unlink()
    with pytest.raises(DataError, match=r"questions_answers_YN/10002.txt: no image of that name"):
        mme.read_release(root)
    with pytest.raises(FileNotFoundError, match="no MME release at"):
        mme.read_release(tmp_path / "nowhere")


def test_text_evaluation_exact_match(tmp_path, tok):
    entries = [{"instruction": "What was the weather?", "input": "It was rainy.", "output": "Rainy."},
               {"instruction": "Where does Tom live?", "input": "", "output": "Pine City."},
               {"instruction": "Which shape has 3 sides?", "input": "", "output": "Triangle."}]
    (tmp_path / "alpaca_test.json").write_text(json.dumps(entries))
    task = data.evaluation("alpaca", str(tmp_path), "test", tok)
    assert task.dataset.samples[1].turns[0][0] == "Instruction: Where does Tom live? \nResponse:"
    result, files = task.score({"alpaca_test_0": "rainy", "alpaca_test_1": " Pine  city.", "alpaca_test_2": "Square."})
    assert result == {"dataset": "alpaca", "split": "test", "n": 3, "exact": 66.67}  # 2 of 3
    assert [p["right"] for p in files["preds.json"].values()] == [True, True, False]
    with pytest.raises(DataError, match="no response for 1 of the 3"):
        task.score({"alpaca_test_0": "x", "alpaca_test_1": "y"})


# ----------------------------------------------------------------------------- the shapes-chat set and a run

@pytest.fixture(scope="module")
def chat_set(tmp_path_factory):
    return shapes_chat.generate(tmp_path_factory.mktemp("chat") / "shapes-chat", pictures=24, quiet=True)


def test_shapes_chat_files_are_in_the_real_formats(chat_set):
    llava = json.loads((chat_set / "conversation_58k.json").read_text())
    e = llava[0]
    assert set(e) == {"id", "image", "conversations"} and e["image"] == "000000000001.jpg"
    assert [t["from"] for t in e["conversations"]] == ["human", "gpt"] * 3
    assert "<image>" in e["conversations"][0]["value"]
    with Image.open(chat_set / "train2014" / "COCO_train2014_000000000001.jpg") as im:
        assert im.format == "JPEG"
    release = mme.read_release(chat_set / "mme")
    assert sorted(release) == ["color", "count", "existence", "position"]
    for images in release.values():  # a yes and a no question per picture
        assert all(sorted(a for _, a in e["questions"]) == ["no", "yes"] for e in images.values())
    alpaca = json.loads((chat_set / "alpaca_test.json").read_text())
    assert all(set(a) == {"instruction", "input", "output"} for a in alpaca)


def test_multiturn_loss_on_every_answer_and_only_there(chat_set, tok):
    ds = data.build_dataset("shapes-chat", str(chat_set), "train", tok, instruct_mode="multiturn", resolution=16)
    i = next(i for i, s in enumerate(ds.samples) if s.pid.startswith("conversation_58k"))
    sample, labels = ds.samples[i], ds.labels[i].tolist()
    assert len(sample.turns) == 3 and sample.image.endswith("COCO_train2014_000000000001.jpg")
    spans, current = [], []
    for x in labels + [IGNORE_INDEX]:  # the runs of loss-carrying labels
        if x == IGNORE_INDEX and current:
            spans.append(current)
            current = []
        elif x != IGNORE_INDEX:
            current.append(x)
    assert len(spans) == 3
    for span, (_, answer) in zip(spans, sample.turns):
        assert span[-1] == tok.eos_id and tok.decode(span[:-1]).strip() == answer.strip()
    recipe = data.build_dataset("shapes-chat", str(chat_set), "train", tok, resolution=16)
    assert len(recipe) == 24 * 5 + shapes_chat.ALPACA  # detail 1 + complex 1 + conversation 3 pairs


def test_chat_flags_and_presets(chat_set, tmp_path):
    cfg, _ = train.make_config(["--dataset", "shapes-chat", "--instruct_mode", "multiturn"])
    assert cfg.preset == "shapes-chat" and cfg.instruct_mode == "multiturn"
    with pytest.raises(UsageError, match="unknown --instruct_mode 'chat'"):
        train.resolve(train.make_config(["--dataset", "shapes-chat", "--instruct_mode", "chat"])[0])
    c13 = train.resolve(train.make_config(["--preset", "chatbot-13b", "--dataset", "instruct"])[0])
    assert (c13.llama_path, c13.temperature, c13.epochs, c13.warmup_epochs) == ("weights/vicuna-13b", 5.0, 15, 0.2)
    assert c13.coco_root == "data/instruct/train2014" and PRESETS["chatbot-7b"].flags["temperature"] == 10.0
    bad = train.make_config(["--dataset", "shapes-chat", "--data_path", str(chat_set),
                             "--coco_root", str(tmp_path / "coco"), "--output_dir", str(tmp_path / "o")])[0]
    with pytest.raises(UsageError, match=f"no COCO train2014 folder at {tmp_path / 'coco'}.*--coco_root"):
        train.main(bad)


def test_chatbot_run_end_to_end(chat_set, tmp_path):
    out = tmp_path / "run"
    cfg, _ = train.make_config(["--dataset", "shapes-chat", "--data_path", str(chat_set), "--instruct_mode",
                                "multiturn", "--max_steps", "2", "--output_dir", str(out)])
    result = train.main(cfg)
    assert result["steps"] == 2 and set(result["eval"]) == {"mme", "alpaca"}
    mme_result = json.loads((out / "eval-mme" / "results.json").read_text())
    assert set(mme_result) >= {"subtasks", "perception", "cognition", "total", "unparsed"}
    assert sorted(mme_result["subtasks"]) == ["color", "count", "existence", "position"]
    preds = json.loads((out / "eval-mme" / "preds.json").read_text())
    assert len(preds) == 4 * shapes_chat.TEST_PICTURES and all(len(v) == 2 for v in preds.values())
    assert json.loads((out / "eval-alpaca" / "results.json").read_text())["n"] == shapes_chat.ALPACA_TEST
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["eval"]["dataset"] for r in logged if "eval" in r] == ["mme", "alpaca"]
    # sample.py on the run: MME from the run's own set by default, the text score on request
    cfg, mode = sample.resolve(sample.SampleConfig(run=str(out)))
    assert (mode, cfg.dataset, cfg.data_path, cfg.output_dir, cfg.template) == \
        ("eval", "mme", f"{chat_set}/mme", f"{out}/eval-mme", "instruction")
    cfg, _ = sample.resolve(sample.SampleConfig(run=str(out), dataset="alpaca"))
    assert (cfg.data_path, cfg.output_dir) == (str(chat_set), f"{out}/eval-alpaca")
