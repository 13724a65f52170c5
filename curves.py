"""Training curves from log.jsonl, drawn with Pillow: a run's curves.png (the loss and the learning
rate per step, each epoch's end marked), which train.py redraws at every checkpoint, and several
runs' losses on one picture, an ablation at a glance:

    python -m curves out/shapes out/shapes-no_visual out/shapes-no_router     # writes curves.png here

Each loss is drawn twice: every step's value, faint, and its running mean over a window of about a
twentieth of the run, strong (a step's loss follows its batch more than the model).
"""
import argparse
import json
import sys
from collections import deque
from pathlib import Path

CURVES = "curves.png"
WIDTH, PANEL, MARGIN = 960, 300, (70, 30, 20, 40)  # picture width, panel height, margins: left, top, right, bottom
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
LR_COLOR, EPOCH_COLOR, INK, GRID = (120, 120, 120), (200, 200, 200), (30, 30, 30), (235, 235, 235)


def read_log(folder) -> list[dict]:
    """The step lines of folder/log.jsonl (a line cut short by a kill is left out)."""
    rows = []
    for line in (Path(folder) / "log.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "step" in row:
            rows.append(row)
    return rows


def running_mean(values: list, window: int) -> list:
    """The mean of each value and the window - 1 before it (fewer at the start), None kept as a gap."""
    out, recent, total = [], deque(), 0.0
    for v in values:
        if v is None:
            out.append(None)
            continue
        recent.append(v)
        total += v
        if len(recent) > window:  # a running sum: one pass, where re-summing each window took 0.7 s for 48k steps
            total -= recent.popleft()
        out.append(total / len(recent))
    return out


class Panel:
    """A plot area of the picture: steps across, values up, with its frame, ticks and title."""

    def __init__(self, draw, font, top: int, title: str, steps: tuple, values: list):
        self.draw, self.font = draw, font
        self.x0, self.y0 = MARGIN[0], top + MARGIN[1]
        self.x1, self.y1 = WIDTH - MARGIN[2], top + PANEL - MARGIN[3]
        self.s0, self.s1 = steps[0], max(steps[1], steps[0] + 1)
        finite = [v for v in values if v is not None]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
        self.v0, self.v1 = (lo - pad if lo < 0 or lo - pad >= 0 else 0.0), hi + pad  # a loss, an lr: from 0
        draw.rectangle([self.x0, self.y0, self.x1, self.y1], outline=INK)
        draw.text((self.x0, self.y0 - 18), title, fill=INK, font=font)
        for k in range(5):  # value ticks and grid lines
            v = self.v0 + (self.v1 - self.v0) * k / 4
            y = self.y(v)
            draw.line([self.x0 + 1, y, self.x1 - 1, y], fill=GRID)
            draw.text((4, y - 7), f"{v:.3g}", fill=INK, font=font)
        for k in range(6):  # step ticks
            s = round(self.s0 + (self.s1 - self.s0) * k / 5)
            draw.text((self.x(s) - 10, self.y1 + 4), str(s), fill=INK, font=font)

    def x(self, step: float) -> float:
        return self.x0 + (step - self.s0) / (self.s1 - self.s0) * (self.x1 - self.x0)

    def y(self, value: float) -> float:
        return self.y1 - (value - self.v0) / (self.v1 - self.v0) * (self.y1 - self.y0)

    def line(self, steps: list, values: list, color, width: int = 2):
        """A polyline through the points, broken where a value is None (a skipped step)."""
        run = []
        for s, v in [*zip(steps, values), (None, None)]:
            if v is None:
                if len(run) > 1:
                    self.draw.line(run, fill=color, width=width)
                run = []
            else:
                run.append((self.x(s), self.y(v)))

    def epochs(self, rows: list):
        """A dotted line after each step that ends an epoch, numbered."""
        for row in rows:
            if float(row["epoch"]).is_integer() and row["step"] < self.s1:
                x = self.x(row["step"])
                for y in range(int(self.y0) + 2, int(self.y1), 6):
                    self.draw.line([x, y, x, y + 2], fill=EPOCH_COLOR)
                self.draw.text((x + 2, self.y0 + 2), f"{int(row['epoch'])}", fill=EPOCH_COLOR, font=self.font)


def canvas(height: int):
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.new("RGB", (WIDTH, height), "white")
    try:  # a scalable font where Pillow has FreeType (10.1+), else its bitmap one
        font = ImageFont.load_default(size=13)
    except TypeError:
        font = ImageFont.load_default()
    return picture, ImageDraw.Draw(picture), font


def losses(rows: list) -> tuple[list, list, list]:
    """(steps, losses with None for skipped steps, their running mean)."""
    steps, values = [r["step"] for r in rows], [r.get("loss") for r in rows]
    return steps, values, running_mean(values, max(1, len(rows) // 20))


def faint(color) -> tuple:
    return tuple(c + (255 - c) * 2 // 3 for c in color)


def draw_run(folder) -> Path:
    """folder/curves.png from folder/log.jsonl: the loss above, the learning rate below, epochs marked."""
    rows = read_log(folder)
    picture, draw, font = canvas(2 * PANEL)
    steps, values, mean = losses(rows)
    span = (0, steps[-1] if steps else 1)
    loss = Panel(draw, font, 0, f"loss per answer token ({Path(folder).name}, {len(rows)} steps)", span, values)
    loss.epochs(rows)
    loss.line(steps, values, faint(COLORS[0]), width=1)
    loss.line(steps, mean, COLORS[0])
    lrs = [r.get("lr") for r in rows]
    lr = Panel(draw, font, PANEL, "learning rate", span, lrs)
    lr.epochs(rows)
    lr.line(steps, lrs, LR_COLOR)
    path = Path(folder) / CURVES
    picture.save(path)
    return path


def draw_compare(folders: list, out) -> list[tuple[str, tuple]]:
    """The runs' losses on one picture at out, a color each (their running means: a step's loss
    follows its batch, and several runs' raw losses hide one another); returns the legend, (name,
    color) per run."""
    logs = [read_log(f) for f in folders]
    names = [Path(f).name for f in folders]
    if len(set(names)) < len(names):  # two runs of the same name in different places: their paths
        names = [str(f) for f in folders]
    picture, draw, font = canvas(PANEL)
    span = (0, max((rows[-1]["step"] for rows in logs if rows), default=1))
    means = [losses(rows)[::2] for rows in logs]  # (steps, running mean) of each run
    panel = Panel(draw, font, 0, "loss per answer token (each run's running mean over a twentieth of it)", span,
                  [v for _, mean in means for v in mean])
    legend = [(name, COLORS[k % len(COLORS)]) for k, name in enumerate(names)]
    for (steps, mean), (_, color) in reversed(list(zip(means, legend))):  # the first run drawn last, on top
        panel.line(steps, mean, color)
    x, y = panel.x1 - 260, panel.y0 + 8  # the legend, top right (losses fall: that corner stays clear)
    draw.rectangle([x - 6, y - 4, panel.x1 - 6, y + 18 * len(legend)], fill="white", outline=GRID)
    for k, (name, color) in enumerate(legend):
        draw.line([x, y + 18 * k + 7, x + 24, y + 18 * k + 7], fill=color, width=3)
        draw.text((x + 32, y + 18 * k), name, fill=INK, font=font)
    picture.save(out)
    return legend


def parser() -> argparse.ArgumentParser:
    """main's command line (tests/test_docs.py checks the docs' commands with it)."""
    ap = argparse.ArgumentParser(description="Draw runs' loss curves on one picture from their log.jsonl.",
                                 allow_abbrev=False)
    ap.add_argument("runs", nargs="+", help="output folders of train.py (each holds a log.jsonl)")
    ap.add_argument("--out", default=CURVES, help=f"the picture to write (default: {CURVES})")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "log.jsonl").is_file()]
    if missing:
        sys.exit(f"error: no log.jsonl in {', '.join(missing)}: give train.py's output folders")
    legend = draw_compare(args.runs, args.out)
    print(f"wrote {args.out}: {', '.join(name for name, _ in legend)}")


if __name__ == "__main__":
    main()
