"""Bad inputs end in one line that says what to fix, before any compute (issue 34's table, row by
row). Each test names the bug it was checked against: planted once, the test failed."""
import pytest

from config import make_config, resolve
from runtime import UsageError
from tests.helpers import run_cli


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
