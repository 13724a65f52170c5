"""Docs that cannot drift: every command that README.md and docs/*.md show (python train.py,
sample.py, demo.py, bench.py, python -m <module>, torchrun ...) is parsed by the parser it would
run, and nothing runs. A renamed flag, a removed choice or a missing required flag fails here,
naming the file, the line and the command.

    README.md, docs/*.md ─> fenced (or indented) code lines, `inline code` of the prose
      ─> shlex: quotes, \\ continuations, # comments, $ prompts, && ; | chains, VAR=value, `...`
      ─> train.py: config.make_config, then config.resolve (it reads no file, only looks for one)
         sample.py, demo.py: their make_config (sample.resolve reads --run's checkpoint: not here)
         torchrun: torch's own parser, then its script's;  bench.py, python -m M: M.parser()
"""
import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

from runtime import UsageError

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ("python", "python3")
NOT_OURS = ("pytest", "pip")  # python -m of other projects' tools: only checked to be installed
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^`\s]*)")
STARTS = re.compile(r"^(\$\s+)?([A-Za-z_]\w*=\S*\s+)*(python3?|torchrun)\s")  # what a command line looks like
SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)  # Markdown's inline code
SEPARATORS = ("&&", "||", ";", "|", "&")


@dataclasses.dataclass
class Command:
    where: str  # README.md:123
    text: str  # as the docs show it, continuations joined
    argv: list[str] | None  # None: shlex could not read it (unbalanced quotes)


def code_and_prose(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every piece that may hold a command: each logical line of a fenced
    or indented code block (\\ continuations joined), and each `inline code` span of the prose."""
    lines, found, paragraph, fence = text.splitlines(), [], [], None

    def prose_ends():
        if paragraph:
            start, joined = paragraph[0][0], "\n".join(t for _, t in paragraph)
            for m in SPAN.finditer(joined):
                found.append((start + joined.count("\n", 0, m.start()), " ".join(m.group(2).split())))
            paragraph.clear()

    i = 0
    while i < len(lines):
        n, line = i + 1, lines[i]
        m = FENCE.match(line)
        if fence is None and m:
            prose_ends()
            fence, skip = m.group(1), m.group(2).lower() in ("python", "py", "pycon")  # Python code, not shell
        elif fence is not None and m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and not m.group(2):
            fence = None
        elif fence is not None or (line.startswith(("    ", "\t")) and STARTS.match(line.strip() + " ")):
            if fence is None:
                prose_ends()
            elif skip:
                i += 1
                continue
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1].rstrip() + " " + lines[i].strip()
            found.append((n, line.strip()))
        elif line.strip():
            paragraph.append((n, line))
        else:
            prose_ends()
        i += 1
    prose_ends()
    return found


def argvs(text: str) -> list[list[str]] | None:
    """The word lists of the commands chained in one shell line, prompt, comment, redirections
    and `...` ("the rest as above") left out; None where shlex cannot read it."""
    text = re.sub(r"^\s*\$\s+", "", text)
    text = re.sub(r"(?<!\S)(\.\.\.|…)(?!\S)", " ", text)
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:
        return None
    chains, drop_next = [[]], False
    for w in words:
        if drop_next:
            drop_next = False
        elif w in SEPARATORS:
            chains.append([])
        elif re.fullmatch(r"\d*(>>?|<)(&\d+)?", w):  # a redirection: its file is the next word, or &N
            drop_next = "&" not in w
        elif w.endswith(";"):
            chains[-1].append(w[:-1])
            chains.append([])
        elif not re.match(r"\d*>", w):  # >file
            chains[-1].append(w)
    return [c for c in chains if c]


def ours(words: list[str]) -> list[str] | None:
    """The words from the program on (python ... or torchrun ...) if it is one of the commands
    checked here, else None (pip, python -c, a word in the prose)."""
    while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # OMP_NUM_THREADS=1 python ...
        words = words[1:]
    if not words:
        return None
    if words[0] == "torchrun":
        return words
    if words[0] not in PYTHON:
        return None
    rest = words[1:]
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):  # python's own flags
        rest = rest[2:] if rest[0] in ("-W", "-X") else rest[1:]
    if rest and (rest[0] == "-m" or rest[0].endswith(".py")):
        return [words[0], *rest]
    return None


def find_commands(path: Path) -> list[Command]:
    rel, found, seen = path.relative_to(ROOT).as_posix() if ROOT in path.parents else path.name, [], {}
    for n, text in code_and_prose(path.read_text()):
        chains = argvs(text)
        if chains is None:  # unreadable: a failure where it looks like a command
            picked = [None] if STARTS.match(text + " ") else []
        else:
            picked = [words for words in map(ours, chains) if words]
        for words in picked:
            where = f"{rel}:{n}"
            seen[where] = seen.get(where, 0) + 1
            found.append(Command(where + (f"({seen[where]})" if seen[where] > 1 else ""), text, words))
    return found


def exact_flags():
    """torch's argparse (torchrun's) without abbreviations, while it lasts: the docs spell its flags
    out, so a renamed one cannot hide behind a prefix."""
    init = argparse.ArgumentParser.__init__
    return mock.patch.object(argparse.ArgumentParser, "__init__",
                             lambda self, *args, **kwargs: init(self, *args, **{**kwargs, "allow_abbrev": False}))


def parse_or_error(fn, *args) -> str | None:
    """None if fn(*args) parses, else its error as the user would read it."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):  # --help prints
            fn(*args)
    except SystemExit as e:  # argparse: 2 and its message on stderr; 0 after --help
        if e.code not in (0, None):
            said = (err.getvalue().strip().splitlines() or [str(e.code)])[-1]
            return re.sub(r"^\S+: error: ", "error: ", said)  # argparse's prog is pytest's here
    except UsageError as e:
        return f"UsageError: {e}"
    return None


def train_args(argv: list[str]):
    import config

    cfg, _ = config.make_config(argv)
    config.resolve(cfg)


def sample_args(argv: list[str]):
    import sample

    sample.make_config(argv)


def demo_args(argv: list[str]):
    import demo

    demo.make_config(argv)


ENTRY = {"train": train_args, "sample": sample_args, "demo": demo_args}


def check_module(name: str, argv: list[str]) -> str | None:
    if name == "torch.distributed.run":
        return check_torchrun(argv)
    top = name.split(".")[0]
    if name in ENTRY:  # our parsers take no abbreviations (allow_abbrev=False): the flags are spelt out
        return parse_or_error(ENTRY[name], argv)
    if (ROOT / f"{top}.py").is_file() or (ROOT / top).is_dir():
        if importlib.util.find_spec(name) is None:
            return f"no module {name} in the repository"
        module = importlib.import_module(name)
        if not hasattr(module, "parser"):
            return f"{name} has no parser() to check its flags with (its main should build it there)"
        if module.parser().allow_abbrev:
            return f"{name}.parser() takes abbreviations: a renamed flag's old prefix would still parse"
        return parse_or_error(module.parser().parse_args, argv)
    if top in NOT_OURS:
        return None if importlib.util.find_spec(top) else f"{top} is not installed"
    return f"no module {name}: neither the repository's nor one of {NOT_OURS}"


def check_script(script: str, argv: list[str]) -> str | None:
    path = ROOT / script
    if not path.is_file():
        return f"no script {script} in the repository"
    return check_module(".".join(path.relative_to(ROOT).with_suffix("").parts), argv)


def check_torchrun(argv: list[str]) -> str | None:
    from torch.distributed.run import get_args_parser

    args = []  # torch's parser as torchrun runs it (abbreviating), and with its flags spelt out
    error = parse_or_error(lambda: args.append(get_args_parser().parse_args(argv)))
    with exact_flags():
        error = error or parse_or_error(get_args_parser().parse_args, argv)
    if error:
        return f"torchrun: {error}"
    a = args[0]
    return (check_module if a.module else check_script)(a.training_script, a.training_script_args)


def check(words: list[str]) -> str | None:
    """None if the command parses, else why not."""
    if words[0] == "torchrun":
        return check_torchrun(words[1:])
    if words[1] == "-m":
        return check_module(words[2], words[3:]) if len(words) > 2 else "python -m without a module"
    return check_script(words[1], words[2:])


COMMANDS = [c for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))] for c in find_commands(path)]
# Wrong in the docs today, said so here until they are fixed (the docs are not this file's to edit)
TORCHRUN_RUN = ("torchrun reads sample.py's --run as an abbreviation of its own --run-path/--run_path and stops "
                "(ambiguous option); `torchrun --nproc_per_node 8 -- sample.py --run ...` passes it on")
KNOWN_WRONG = {
}


def marked(cmd: Command):
    reason = KNOWN_WRONG.get(" ".join(cmd.argv or []))
    return pytest.param(cmd, id=cmd.where, marks=[pytest.mark.xfail(strict=True, reason=reason)] if reason else [])


@pytest.mark.parametrize("cmd", [marked(c) for c in COMMANDS])
def test_command_parses(cmd):
    error = "shlex cannot read it (unbalanced quotes?)" if cmd.argv is None else check(cmd.argv)
    if error:
        pytest.fail(f"{cmd.where}: {cmd.text}\n  {error}", pytrace=False)


def test_the_docs_hold_commands():
    """The reader cannot silently find nothing: the docs show every entry point, many times."""
    kinds = {c.argv[1] if c.argv[0] in PYTHON and c.argv[1] != "-m" else c.argv[0] for c in COMMANDS if c.argv}
    assert len(COMMANDS) >= 30, [c.where for c in COMMANDS]
    assert {"train.py", "sample.py", "demo.py", "bench.py", "torchrun"} <= kinds, kinds
    assert any(c.argv and c.argv[1:3] == ["-m", "data.table"] for c in COMMANDS)


def test_known_wrong_commands_are_still_there():
    """A command fixed in the docs (or gone from them) leaves KNOWN_WRONG too."""
    shown = {" ".join(c.argv) for c in COMMANDS if c.argv}
    assert not set(KNOWN_WRONG) - shown, "fixed in the docs: remove from KNOWN_WRONG"


def test_the_reader_finds_what_a_shell_would_run(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("""Prose with `python train.py --dataset shapes` inline, and one over
two lines: `python train.py --preset
lavin-7b --dry_run`, not `--epochs 3` nor `python -c "pass"` nor `pip install torch`.

```bash
$ OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=0 python sample.py --run out/x \\
    --prompt "a # b; c" --image $IMG   # a comment
cd out && python -m data.table --data <dir> --preds p.json 2>&1 > log.txt
torchrun --nproc_per_node 8 train.py ...      # each rank
The answer is A.
```

```python
python = "python train.py --not_a_flag"
```

    python demo.py --run out/shapes-chat
""")
    got = [(c.where.split(":")[1], c.argv) for c in find_commands(page)]
    assert got == [
        ("1", ["python", "train.py", "--dataset", "shapes"]),
        ("2", ["python", "train.py", "--preset", "lavin-7b", "--dry_run"]),
        ("6", ["python", "sample.py", "--run", "out/x", "--prompt", "a # b; c", "--image", "$IMG"]),
        ("8", ["python", "-m", "data.table", "--data", "<dir>", "--preds", "p.json"]),
        ("9", ["torchrun", "--nproc_per_node", "8", "train.py"]),
        ("17", ["python", "demo.py", "--run", "out/shapes-chat"]),
    ]


@pytest.mark.parametrize("command", [
    "python train.py --dataset shapes --no_such_flag",
    "python train.py --dataset nope",
    "python train.py --bits 5",
    "python train.py --prompt_format QCM-XYZ",
    "python sample.py --dataset nope",
    "python sample.py --prompt ''",
    "python demo.py --port 70000",
    "python bench.py --only nope",
    "python -m data.table --data d",  # --preds is required
    "python -m data.tabel --preds p.json",
    "python -m not_a_tool",
    "python nope.py",
    "torchrun --no_such_flag 1 train.py",
    "torchrun --nproc_per_node 8 sample.py --bogus",
    "torchrun --nproc_per 8 train.py",  # torchrun takes it, as --nproc_per_node; the docs spell it out
    "python sample.py --run out/x --max_new 8",  # argparse would read --max_new_tokens: spelt out
    "python -m data.table --pred p.json",  # argparse would read --preds
])
def test_a_wrong_command_fails(command):
    assert check(ours(argvs(command)[0])) is not None
