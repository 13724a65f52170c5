"""Bad inputs end in one line that says what to fix, before any compute (issue 34's table, row by
row). Each test names the bug it was checked against: planted once, the test failed."""
import pytest

from config import make_config, resolve
from runtime import UsageError
from tests.helpers import edit_json, run_cli


@pytest.mark.parametrize("flag,value,said", [
    ("blr", "nan", "--blr must be a finite number above 0, got nan"),
    ("blr", "inf", "--blr must be a finite number above 0, got inf"),
    ("blr", "-1", "--blr must be a finite number above 0, got -1.0"),
    ("temperature", "nan", "--temperature must be a finite number above 0, got nan"),
    ("dist_timeout", "0", "--dist_timeout must be a finite number above 0, got 0.0"),
    ("save_interval", "-5", "--save_interval must be at least 0, got -5"),
    ("max_steps", "-1", "--max_steps must be at least 0, got -1"),
])
def test_settings_that_cannot_train_are_refused(flag, value, said):
    """Planted: the plain `cfg.blr <= 0` of before (nan and inf pass it); save_interval unchecked."""
    cfg, _ = make_config(["--dataset", "shapes", f"--{flag}", value])
    with pytest.raises(UsageError) as e:
        resolve(cfg)
    assert str(e.value) == said


def test_a_nan_learning_rate_is_one_line_on_the_command_line(tmp_path):
    """Planted: the same; torch's optimizer then raised `Invalid learning rate: nan` in a traceback."""
    r = run_cli("--dataset", "shapes", "--blr", "nan", "--output_dir", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.strip() == "error: --blr must be a finite number above 0, got nan"
    assert not (tmp_path / "out").exists()


def test_params_json_that_does_not_match_its_weights_is_one_line(tmp_path, tiny_set):
    """params.json says dim 128 over weights 96 wide: one line naming the folder, params.json, the
    key and both shapes, from train.py as from sample.py. Planted: train.build_model without its
    try (the 22-line traceback of before); check_state's source left as "checkpoint"."""
    import shutil

    llama = tmp_path / "llama"
    shutil.copytree(tiny_set / "llama", llama)
    shutil.copy(tiny_set / "tokenizer.model", llama / "tokenizer.model")
    edit_json(llama / "params.json", lambda p: p.update(dim=128))
    r = run_cli("--dataset", "shapes", "--data_path", str(tiny_set), "--llama_path", str(llama),
                "--output_dir", str(tmp_path / "out"))
    want = (f"error: {llama}'s weights against its params.json: tok_embeddings.weight has shape (")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(want) and "96), the model's is (" in r.stderr and "128)" in r.stderr
