"""data/mme.py: MME's reader and scores (expected scores computed by hand in the comments), the
evaluation task, and every bad input named."""
import json
from pathlib import Path

import pytest
from PIL import Image

from data import mme
from data.scienceqa import DataError


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


def test_mme_task_prompts_stop_and_scores(tmp_path, shapes_tok):
    task = mme.Evaluation(str(write_mme(tmp_path / "MME")), shapes_tok, resolution=16)
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
