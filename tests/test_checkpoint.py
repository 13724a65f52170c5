"""checkpoint.py and what rests on it, with real processes: a worker killed under torchrun
--max_restarts (the group restarts and carries on, bit for bit), a killed run rerun with --resume
auto, a rank stopped with SIGSTOP (the other gives up within --dist_timeout, in one line), a
checkpoint that cannot be written (the last one stays whole)."""
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from checkpoint import logged_step
from runtime import UsageError
from tests.helpers import config, losses

ROOT = Path(__file__).resolve().parents[1]
# 2 processes x batch 1 x 2 accumulated = 4 samples a step: 6 steps an epoch of the tiny set's 24
TWO = ["--epochs", "3", "--batch_size", "1", "--effective_batch", "4", "--skip_eval", "--seed", "7"]


def torchrun(out: Path, *args, restarts=0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max_restarts", str(restarts), "train.py", *args, "--output_dir", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def worker(p: subprocess.Popen, rank: int, timeout=60) -> int:
    """The pid of torchrun p's worker of that rank (its child whose RANK is rank)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def logged(out: Path) -> int:
    """Steps in out/log.jsonl so far, read while the run writes (or rewrites) it."""
    log = out / "log.jsonl"
    return sum(logged_step(row) is not None for row in log.read_text().splitlines()) if log.exists() else 0


def wait_for_steps(p: subprocess.Popen, out: Path, n: int, timeout=120):
    deadline = time.time() + timeout
    while logged(out) < n:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() < deadline, "too slow"
        time.sleep(0.02)


def adapters(out: Path) -> dict:
    return torch.load(out / "adapters.pth", weights_only=True)["model"]


def test_workers_killed_under_torchrun_restart_and_carry_on_exactly(tiny_set, tmp_path):
    """SIGKILL to rank 0 before the first checkpoint, then to rank 1 after one: torchrun restarts the
    group twice, which forms again each time, starts again at step 0, then resumes from the
    checkpoint, and ends equal to the uninterrupted run: the same losses, one line a step, the same
    adapters (each rank's dropout RNG restored). Checkpoints at the epochs' ends: steps 6, 12, 18."""
    full = tmp_path / "full"
    p = torchrun(full, "--data_path", str(tiny_set), *TWO)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    out = tmp_path / "run"
    p = torchrun(out, "--data_path", str(tiny_set), *TWO, restarts=2)
    wait_for_steps(p, out, 1)
    first = worker(p, 1)
    os.kill(worker(p, 0), signal.SIGKILL)
    assert not (out / "checkpoint.pth").exists()  # the kill came before the first checkpoint
    deadline = time.time() + 120
    while not (out / "checkpoint.pth").exists():  # the restarted group's first checkpoint
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.02)
    second = worker(p, 1)
    assert second != first
    os.kill(second, signal.SIGKILL)
    said, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"restarted by torchrun (attempt 1): no checkpoint in {out} yet, starting from step 0\n" in said
    at = re.search(f"restarted by torchrun \\(attempt 2\\): resuming from {re.escape(str(out))}/checkpoint.pth "
                   f"at step (\\d+)\n", said)
    assert at and int(at[1]) in (6, 12), said[-2000:]
    assert losses(out) == losses(full) and len(losses(out)) == 18
    a, b = adapters(out), adapters(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_run_rerun_with_resume_auto_carries_on_exactly(tiny_set, tmp_path, capsys):
    """The requeue: one process SIGKILLed mid-run, then the very same command again. --resume auto
    starts afresh in the empty folder the first time and carries on from checkpoint.pth the second,
    ending equal to an uninterrupted run (dropout on)."""
    out = tmp_path / "run"
    args = ["train.py", "--data_path", str(tiny_set), "--epochs", "3", "--batch_size", "2", "--effective_batch", "4",
            "--save_interval", "3", "--skip_eval", "--resume", "auto", "--output_dir", str(out)]
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_steps(p, out, 5)  # past the checkpoint at step 3
    p.kill()
    said, _ = p.communicate()
    assert f"--resume auto: no checkpoint in {out} yet, starting from step 0" in said
    step = torch.load(out / "checkpoint.pth", weights_only=True)["step"]
    assert 3 <= step < 18
    train.main(*train.make_config(args[1:]))  # the same command again, in this process
    assert f"--resume auto: resuming from {out / 'checkpoint.pth'} at step {step}\n" in capsys.readouterr().out
    train.main(config(tiny_set, tmp_path / "full", epochs=3, batch_size=2, effective_batch=4))
    assert losses(out) == losses(tmp_path / "full") and len(losses(out)) == 18
    a, b = adapters(out), adapters(tmp_path / "full")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resume_auto_refuses_another_runs_folder(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(config(tiny_set, out, max_steps=1))
    with pytest.raises(UsageError, match=f"{out} already holds another run .*epochs=2, this run has epochs=3"):
        train.main(config(tiny_set, out, epochs=3, resume="auto"))
    with pytest.raises(UsageError, match="already holds a run"):  # and without auto, as before
        train.main(config(tiny_set, out, max_steps=2))


def test_a_rank_that_hangs_stops_the_other_within_the_timeout_in_one_line(tiny_set, tmp_path):
    """SIGSTOP to rank 1 mid-run: rank 0 gives up within --dist_timeout (3 s here) and says so in one
    line, not a page of Gloo traceback."""
    out = tmp_path / "run"
    p = torchrun(out, "--data_path", str(tiny_set), *TWO, "--epochs", "400", "--dist_timeout", "0.05")
    wait_for_steps(p, out, 2)
    rank0, rank1 = worker(p, 0), worker(p, 1)
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.time()
    while Path(f"/proc/{rank0}").exists() and Path(f"/proc/{rank0}/stat").read_text().split()[2] != "Z":
        assert time.time() - stopped < 60, "rank 0 still waits"
        time.sleep(0.1)
    waited = time.time() - stopped
    os.kill(rank1, signal.SIGKILL)  # torchrun would wait 30 s to kill a stopped process
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert 2.5 <= waited < 30, waited  # the timeout, not torch's 30 minutes
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 lost a peer process (Timed out"), err[-3000:]
    assert "unbound_buffer.cc" not in err and "Traceback (most recent call last):\n  File \"" + str(ROOT) not in err


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_whole(tiny_set, tmp_path, monkeypatch):
    """A full disk at the second checkpoint: the run stops with one line naming the file and the
    reason, no temporary file is left, and the first checkpoint resumes the run exactly."""
    out = tmp_path / "run"
    save, calls = torch.save, []

    def disk_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # checkpoint.pth and adapters.pth at step 2, then checkpoint.pth at step 3
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UsageError) as e:
        train.main(config(tiny_set, out, save_interval=2))
    assert str(e.value).startswith(f"cannot write {out / 'checkpoint.pth'} at step 3: No space left on device;")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["adapters.pth", "checkpoint.pth", "curves.png", "log.jsonl"]
    monkeypatch.setattr(torch, "save", save)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2
    train.main(config(tiny_set, out, save_interval=2, resume="auto"))
    train.main(config(tiny_set, tmp_path / "full", save_interval=2))
    assert losses(out) == losses(tmp_path / "full") and len(losses(out)) == 6


def test_overwrite_then_a_crash_before_the_first_checkpoint_restarts_at_step_0(tiny_set, tmp_path, monkeypatch):
    """--overwrite replaces the folder's run: its checkpoint goes at the start, so a torchrun restart
    of the new run before its own first checkpoint starts again instead of resuming the old one."""
    out = tmp_path / "run"
    train.main(config(tiny_set, out, max_steps=2))
    real = train.train_step

    def crash(*args):
        raise RuntimeError("a worker died")

    monkeypatch.setattr(train, "train_step", crash)
    with pytest.raises(RuntimeError, match="a worker died"):
        train.main(config(tiny_set, out, overwrite=True, adapter_dim=4))  # another model: no resume possible
    assert not (out / "checkpoint.pth").exists()
    monkeypatch.setattr(train, "train_step", real)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    result = train.main(config(tiny_set, out, overwrite=True, adapter_dim=4, max_steps=2))
    assert result["steps"] == 2 and len(losses(out)) == 2


# Two ranks train under torchrun, then fail inside DDP's forward (as when a peer dies); after each
# train.main, how many DDP wrappers are still in memory (the failed run's exception still held).
# The garbage collector runs only when asked, so one left to the collection at interpreter exit is
# counted, not freed by chance.
LEFT_BEHIND = """
import dataclasses, gc, sys
gc.disable()
sys.path.insert(0, sys.argv[1])
import lavin
import train
from torch.nn.parallel import DistributedDataParallel as DDP

cfg, notes = train.make_config(sys.argv[2:])
train.main(cfg, notes)
finished = sum(isinstance(o, DDP) for o in gc.get_objects())
calls, forward = [], lavin.LaVIN.forward

def planted(*args, **kwargs):  # the second forward raises, as a collective does when a peer died
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("planted: a collective failed")
    return forward(*args, **kwargs)

lavin.LaVIN.forward = planted
try:
    train.main(dataclasses.replace(cfg, output_dir=cfg.output_dir + "-failed"))
except RuntimeError as e:  # held, as sys.last_traceback holds an uncaught one until the exit
    assert "planted" in str(e)
    failed = sum(isinstance(o, DDP) for o in gc.get_objects())
print("DDP wrappers left:", finished, failed)
"""


def test_a_two_process_run_frees_its_ddp_wrapper_before_the_interpreter_exits(tiny_set, tmp_path):
    """After a finished run and after one that failed in DDP's forward, no DDP wrapper is left for the
    garbage collection at interpreter exit: there a Gloo worker thread aborted the process now and
    then ("terminate called without an active exception", SIGABRT) after a run that had finished
    and saved, and torchrun reported it failed (CI caught it in the restart test above)."""
    script = tmp_path / "left_behind.py"
    script.write_text(LEFT_BEHIND)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ROOT), "--data_path", str(tiny_set), "--epochs", "1", "--batch_size", "1", "--effective_batch", "4",
           "--skip_eval", "--output_dir", str(tmp_path / "run")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("DDP wrappers left: 0 0\n") == 2, r.stdout[-3000:]
    assert len(losses(tmp_path / "run")) == 6
