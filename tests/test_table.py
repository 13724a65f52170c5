"""data/table.py: ScienceQA's accuracy table worked out by hand, and the picture of sample answers."""
import json

import pytest
from PIL import Image

from data import shapes, table
from data.scienceqa import DataError
from tests.helpers import read


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


def test_samples_picture_shows_every_kind_of_image_question(tmp_path):
    from data.table import draw_samples

    problems = shapes.write_problems(tmp_path, 300, seed=0)
    test = [pid for pid in read(tmp_path, "pid_splits.json")["test"] if problems[pid]["image"]]
    preds = {pid: problems[pid]["answer"] if i % 2 else -1 for i, pid in enumerate(test)}
    drawn = draw_samples(tmp_path, "test", preds, tmp_path / "samples.png", n=6, columns=3)
    assert len(drawn) == min(6, len(test)) and {pid for pid, _ in drawn} <= set(test)
    assert all(right == (preds[pid] == problems[pid]["answer"]) for pid, right in drawn)
    kinds = {" ".join(problems[pid]["question"].split()[:2]) for pid in test}
    assert {" ".join(problems[pid]["question"].split()[:2]) for pid, _ in drawn} == kinds
    assert Image.open(tmp_path / "samples.png").size[0] == 3 * 160


def test_choice_indices_out_of_range_are_named_not_only_counted(sqa, tmp_path):
    """A preds.json indexed from 1: each index past the choices is counted unparsed, and one warning
    says how many were out of range (planted: the warning removed: only "N answers unparsed")."""
    (tmp_path / "p.json").write_text(json.dumps({**PREDS, "t4": 2, "t6": 9}))  # t4 has 2 choices, t6 3
    with pytest.warns(UserWarning, match=r"^3 predictions are choice indices out of range, counted unparsed \(e.g. "
                                         r"t4: 2 of 2 choices, t6: 9 of 3 choices, t12: 7 of \d choices\): indices "
                                         r"count from 0, and -1 is an unparsed answer$"):
        result = table.main(["--data", str(sqa), "--preds", str(tmp_path / "p.json"), "--out", str(tmp_path / "r.json")])
    assert result["unparsed"] == 6


@pytest.mark.parametrize("pred", [True, False])
def test_true_or_false_is_no_choice(sqa, tmp_path, pred):
    """JSON true/false are Python's bool, an int: never read as choice 1 or 0 (planted: the
    `not isinstance(pred, bool)` dropped)."""
    (tmp_path / "p.json").write_text(json.dumps({**PREDS, "t4": pred}))
    with pytest.raises(DataError, match=f"prediction for t4 should be generated text or a choice index, got {pred}"):
        table.main(["--data", str(sqa), "--preds", str(tmp_path / "p.json")])


def test_the_command_line_warning_is_one_line_of_its_own(sqa, tmp_path):
    """`python -m data.table` prints the warning as `warning: ...`, a line of its own, before the table
    (stderr and stdout together, as a terminal shows them). Planted: plain_warnings' "\\n" dropped
    (the table's first line then ran on after the warning); plain_warnings() not called."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    (tmp_path / "p.json").write_text(json.dumps(PREDS))
    r = subprocess.run([sys.executable, "-m", "data.table", "--data", str(sqa), "--preds", str(tmp_path / "p.json"),
                        "--out", str(tmp_path / "r.json")], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    lines = r.stdout.split("\n")
    assert r.returncode == 0 and lines[0] == ("warning: 1 predictions are choice indices out of range, counted "
                                              "unparsed (e.g. t12: 7 of 2 choices): indices count from 0, and -1 is "
                                              "an unparsed answer"), r.stdout
    assert lines[1].startswith("split test: 12 problems, 4 answers unparsed")
