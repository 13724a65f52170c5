"""runtime.py: the thread choice on shared cores, the precision rule, compile by default on a GPU."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from config import make_config
from runtime import (StopRequest, UsageError, busy_cores_note, cpu_threads, free_cores, others_running, pick_dtype,
                     use_compile)


ROOT = Path(__file__).resolve().parents[1]


def test_a_thread_for_each_core_other_work_leaves_free():
    assert free_cores(2, 0, 2) == 2  # idle: torch's default
    assert free_cores(2, 1, 2) == 1
    assert free_cores(2, 3, 2) == 1  # never none
    assert free_cores(16, 4, 8) == 8  # never more than torch's default


def test_busy_processes_are_seen_and_leave_one_thread():
    # from torch's default, a thread per core (conftest may have taken fewer on a busy machine)
    original, n = torch.get_num_threads(), len(os.sched_getaffinity(0))
    if "OMP_NUM_THREADS" in os.environ or not 2 <= n <= 4:
        pytest.skip("needs a machine of 2 to 4 cores and no OMP_NUM_THREADS")
    torch.set_num_threads(n)
    before = others_running()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(os.sched_getaffinity(0)))]
    try:
        time.sleep(0.5)
        assert others_running() >= before + len(busy) - 1
        assert cpu_threads(torch.device("cpu")) == 1 and torch.get_num_threads() == 1
        assert cpu_threads(torch.device("cuda")) == 1  # a GPU run's threads are left as they are
        torch.set_num_threads(n)
        assert f"torch runs on 1 thread(s) instead of {n}" in busy_cores_note(torch.device("cpu"))
    finally:
        for p in busy:
            p.kill()
        torch.set_num_threads(original)


def test_a_fixed_thread_count_holds_whatever_the_load(monkeypatch):
    """--threads N (the laptop presets: 1) is taken as it is, however busy the cores (here: 64
    other tasks, as Linux's procs_running would count them), without a note: a run's numbers can
    follow its thread count, and then they would follow the load."""
    import runtime

    original = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "others_running", lambda: 64)
    try:
        torch.set_num_threads(2)
        assert cpu_threads(torch.device("cpu")) == 1  # the load is seen: without a fixed count, 1 thread
        for n in (2, 1):
            torch.set_num_threads(3 - n)
            assert cpu_threads(torch.device("cpu"), n) == n == torch.get_num_threads()
            assert busy_cores_note(torch.device("cpu"), n) == ""
    finally:
        torch.set_num_threads(original)
    for dataset in ("shapes", "shapes-chat", "shapes-coco"):
        assert make_config(["--dataset", dataset])[0].threads == 1
    assert make_config(["--dataset", "scienceqa"])[0].threads == 0  # a GPU run: its threads are not touched
    assert make_config(["--dataset", "shapes", "--threads", "2"])[0].threads == 2


def test_a_thread_count_the_user_chose_is_kept():
    code = "import torch; from runtime import cpu_threads; print(cpu_threads(torch.device('cpu')), torch.get_num_threads())"
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    finally:
        busy.kill()
    assert out.stdout.split() == ["2", "2"]


def test_precision():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("fp16", torch.device("cpu")) == torch.float16


def test_a_second_ctrl_c_stops_at_once():
    """Real SIGINTs to this process: the first is a request (the step finishes, the checkpoint is
    saved), the second raises at once; the previous handler is back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in the main thread, between bytecodes
        assert stop.asked
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)
    assert signal.getsignal(signal.SIGINT) is before


def test_compile_is_the_default_on_a_gpu_only(monkeypatch):
    import importlib.util

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile(False, False, cpu) == (False, "")  # the laptop demo stays eager
    assert use_compile(True, False, cpu) == (True, "")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    assert use_compile(False, False, cuda) == (True, "")
    assert use_compile(False, True, cuda) == (False, "")
    with pytest.raises(UsageError, match="contradict"):
        use_compile(True, True, cuda)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    compiled, note = use_compile(False, False, cuda)  # no triton: eager, and the user is told why
    assert not compiled and "triton" in note
    with pytest.raises(UsageError, match="needs triton"):
        use_compile(True, False, cuda)
