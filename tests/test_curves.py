"""curves.py: train.py's curves.png, read back by its pixels, and the picture of several runs."""
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import curves
import train
from tests.helpers import config, losses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tiny_set, tmp_path_factory) -> list[Path]:
    """Two real runs of the tiny set, 6 epochs of 3 steps at a high lr (the tiny set's loss falls
    within them): LaVIN and its no-visual ablation."""
    root = tmp_path_factory.mktemp("curves")
    for name, kw in (("lavin", {}), ("lavin-no_visual", {"no_visual": True})):
        train.main(config(tiny_set, root / name, epochs=6, warmup_epochs=1, batch_size=8, blr=0.2, **kw))
    return [root / "lavin", root / "lavin-no_visual"]


def pixels(path: Path, color: tuple, box=None) -> list[tuple[int, int]]:
    """(x, y) of every pixel of exactly that color, inside box (x0, y0, x1, y1) if given."""
    im = Image.open(path).convert("RGB")
    x0, y0, x1, y1 = box or (0, 0, *im.size)
    data = im.load()
    return [(x, y) for x in range(x0, x1) for y in range(y0, y1) if data[x, y] == color]


def ends(points: list) -> tuple[float, float]:
    """The curve's mean height (pixel rows: down is larger) over the left third of its columns and
    over the right third (each column's height the mean of its points)."""
    columns = {}
    for x, y in points:
        columns.setdefault(x, []).append(y)
    xs = sorted(columns)
    height = [sum(columns[x]) / len(columns[x]) for x in xs]
    third = len(xs) // 3
    return sum(height[:third]) / third, sum(height[-third:]) / third


def test_a_runs_curves_show_its_loss_fall_its_schedule_and_its_epochs(runs):
    run = runs[0]
    steps = losses(run)
    assert sum(steps[:6]) > 2 * sum(steps[-6:])  # the run's loss fell ...
    path = run / curves.CURVES  # ... drawn by train.py at its checkpoints
    loss = pixels(path, curves.COLORS[0], (0, 0, curves.WIDTH, curves.PANEL))
    left, right = ends(loss)
    assert right > left + 20  # ... and the picture's loss curve ends lower than it starts
    lr = pixels(path, curves.LR_COLOR, (0, curves.PANEL, curves.WIDTH, 2 * curves.PANEL))
    top = min(y for _, y in lr)
    left, right = ends(lr)
    assert left > top + 50 and right > top + 50  # warm-up, then down to 0
    plot = (curves.MARGIN[0] + 1, curves.MARGIN[1] + 20, curves.WIDTH - curves.MARGIN[2] - 1,
            curves.PANEL - curves.MARGIN[3] - 1)  # inside the loss panel's frame, below the epochs' numbers
    marks = sorted({x for x, _ in pixels(path, curves.EPOCH_COLOR, plot)})
    lines = [x for k, x in enumerate(marks) if k == 0 or x - marks[k - 1] > 3]
    assert len(lines) == 5  # the ends of epochs 1 to 5 (the 6th is the picture's right edge)


def test_several_runs_on_one_picture_a_curve_and_a_legend_entry_each(runs, tmp_path):
    out = tmp_path / "both.png"
    r = subprocess.run([sys.executable, "-m", "curves", *map(str, runs), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out}: lavin, lavin-no_visual"
    legend = curves.draw_compare(runs, tmp_path / "again.png")
    assert [name for name, _ in legend] == ["lavin", "lavin-no_visual"]
    assert len({color for _, color in legend}) == 2
    box = (curves.WIDTH - curves.MARGIN[2] - 270, 0, curves.WIDTH, 90)  # the legend, top right
    for _, color in legend:
        assert len(pixels(out, color, box)) >= 24  # its swatch
        assert len(pixels(out, color)) > 200 + len(pixels(out, color, box))  # and its curve
    assert len(pixels(out, curves.COLORS[2])) == 0  # no third curve


def test_a_folder_without_a_log_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "curves", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == f"error: no log.jsonl in {tmp_path}: give train.py's output folders"
