"""What every entry point sets up the same way: its flags (one per field of its config dataclass),
the CPU's threads, torchrun's processes, the precision, Ctrl-C as a request to stop (training), and
the one kind of error a user sees as a single line.

CPU threads. torch splits each op over one thread per core, and the threads meet at the end of
it. On cores shared with other work, a partner thread that was descheduled keeps the others
waiting for a whole time slice: on 2 cores with two other busy processes the laptop demo's step
ran 4.7x slower than on idle cores, at 1 thread 1.9x. And how an op is split can change its
rounding, so on some CPUs a run's numbers follow its thread count. Hence two policies
(`cpu_threads`): a fixed count, which gives the same numbers on any load (the laptop presets take
1 thread: the tiny model gains about 10% from a second core when the cores are idle, and loses
2.5x when they are busy), or, by default, a thread for each core that the tasks running when the
run starts leave free.
"""
import argparse
import dataclasses
import datetime
import os
import signal
import threading
import time

import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad input from the user: printed as one line, no traceback."""


def plain_warnings():
    """An entry point's warnings as one line each, "warning: <message>", without Python's file,
    line and source. It sets warnings.formatwarning, the hook the warnings module offers for
    this, for the whole process: call it from a script's __main__ only, never from a library."""
    import warnings

    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"


def setup_distributed(device: str, timeout_minutes: float = 10.0):
    """(rank, world size, device): torchrun's environment if present (NCCL on GPUs, Gloo on the
    CPU), else a single plain process. A collective that waits longer than timeout_minutes on a
    peer that died or hangs raises (Gloo) or aborts the process (NCCL's watchdog), so torchrun can
    restart the group instead of every rank waiting for torch's default 30 minutes."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device or ("cuda" if cuda else "cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **attempt_store(rank, world, timeout))
    return rank, world, torch.device(f"cuda:{local}" if cuda else "cpu")


def restart_count() -> int:
    """How often torchrun (--max_restarts) has restarted this group: 0 on its first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def attempt_store(rank: int, world: int, timeout) -> dict:
    """init_process_group's store for this attempt of a torchrun group, {} outside torchrun.
    torchrun's agent keeps one key-value store for the whole job, and the processes of a
    restarted group meet there again: each writes its address under the same key as before, so
    a fast one can read a dead predecessor's address and fail to connect ("Connection refused",
    measured with Gloo). A prefix of the attempt's own keeps each attempt's keys apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return {"store": dist.PrefixStore(f"lavin/attempt{restart_count()}", agent), "rank": rank, "world_size": world}


def peer_lost(e: BaseException) -> str:
    """The one-line reason when e is a collective giving up on a rank that died or hangs (Gloo's
    timeout or closed connection, torch's DistError), else ""."""
    text = str(e)
    gloo = "gloo" in text and any(w in text for w in ("Timed out", "Connection", "closed"))
    if not dist.is_initialized() or not (isinstance(e, dist.DistError) or gloo):
        return ""
    reason = text.split("] ", 1)[-1].split(". ")[0]  # past Gloo's [file:line], its first sentence
    return f"rank {dist.get_rank()} lost a peer process ({reason})"


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else fp16 (with a GradScaler in training); fp32 on the CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def use_compile(compile: bool, no_compile: bool, device: torch.device) -> tuple[bool, str]:
    """(compile or not, a note for the user or ""). On a GPU torch.compile is the default: eager
    PyTorch spends most of a LaVIN step launching thousands of small kernels. On the CPU it stays
    opt-in (inductor's C++ compile takes minutes there and buys little)."""
    import importlib.util

    if compile and no_compile:
        raise UsageError("--compile and --no_compile contradict each other: give one")
    wanted = compile or (device.type == "cuda" and not no_compile)
    if wanted and device.type == "cuda" and importlib.util.find_spec("triton") is None:  # torch.compile's GPU backend
        if compile:
            raise UsageError("--compile on a GPU needs triton (pip install triton); or leave out --compile")
        return False, "torch.compile needs triton on a GPU (pip install triton): running eagerly, more slowly"
    return wanted, ""


class Interrupted(Exception):
    """A training run stopped on Ctrl-C (or SIGTERM) after saving: the message says how to continue."""


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (torchrun passes Ctrl-C on as one) as a request: the step in
    progress finishes, every rank stops after the same step and the checkpoint is saved. A
    second signal stops at once; checkpoint.pth stays whole (atomic_save renames a finished file)."""

    asked = False

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signals reach only that thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def agreed(self, world: int, device) -> bool:
        """Whether any rank was asked to stop: all of them must stop after the same step."""
        if world == 1:
            return self.asked
        flag = torch.tensor(float(self.asked), device=device)
        dist.all_reduce(flag)
        self.asked = bool(flag.item())
        return self.asked

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def busy_cores_note(device: torch.device, threads: int = 0) -> str:
    """cpu_threads(device, threads), and a line to tell the user when busy cores left fewer
    threads than torch's default ("" otherwise)."""
    n = torch.get_num_threads()
    took = cpu_threads(device, threads)
    if took < n and not threads:
        return (f"the CPU's cores are busy with other work: torch runs on {took} thread(s) instead of {n} "
                f"(--threads N or OMP_NUM_THREADS=N chooses)")
    return ""


def cpu_threads(device: torch.device, threads: int = 0) -> int:
    """Set and return the threads for torch's CPU ops. threads > 0: exactly that many, whatever
    the load (the same numbers on a busy machine as on an idle one). 0: a thread count the user
    gave (OMP_NUM_THREADS; torchrun sets 1 for several processes a node), else one per core that
    other work leaves free (at least 1), as seen now. A GPU run's threads are left as they are."""
    n = torch.get_num_threads()
    if device.type != "cpu":
        return n
    if threads > 0:
        torch.set_num_threads(threads)
        return threads
    if n == 1 or "OMP_NUM_THREADS" in os.environ:
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or n  # macOS has none
    threads = free_cores(cores, others_running(), n)
    if threads != n:
        torch.set_num_threads(threads)
    return threads


def free_cores(cores: int, others: int, most: int) -> int:
    """Threads for `cores` cores of which `others` running tasks take one each: at least 1."""
    return max(1, min(most, cores - others))


def others_running(samples: int = 10, interval: float = 0.01, stat: str = "/proc/stat") -> int:
    """How many other tasks the kernel has running or ready to run (Linux's /proc/stat
    procs_running, less this thread): the median of samples over a tenth of a second, spent
    spinning, not sleeping, so that two runs started together see each other. 0 where there is
    no /proc/stat."""
    counts = []
    for _ in range(samples):
        try:
            with open(stat) as f:
                counts += [int(line.split()[1]) - 1 for line in f if line.startswith("procs_running")]
        except OSError:
            return 0
        until = time.perf_counter() + interval
        while time.perf_counter() < until:
            pass
    return sorted(counts)[len(counts) // 2] if counts else 0


def message(e: BaseException) -> str:
    """An exception's text for a one-line error: KeyError's str() quotes its message."""
    return e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)


def config_parser(cls, description: str, fields=None, choices: dict | None = None, shown: dict | None = None,
                  default_text=None) -> argparse.ArgumentParser:
    """The command line of a config dataclass: a flag per field (or per name in `fields`), the
    field's comment its --help. Only the flags given land in the namespace, so a caller can tell
    them from the defaults (train.py's presets); cls(**vars(namespace)) fills in the rest. A field
    that defaults to True is turned off by --no-NAME. choices: {field: values} that argparse checks;
    shown: {field: values} only shown, for a caller whose own check says more. default_text(field):
    the default as --help states it (else its value). No abbreviations: a flag is typed whole."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    helps, choices, shown = field_help(cls), choices or {}, shown or {}
    for f in dataclasses.fields(cls):
        if fields is not None and f.name not in fields:
            continue
        default = default_text(f) if default_text else repr(f.default)
        text = f"{helps[f.name]} (default: {default})".replace("%", "%%")
        if f.type == "bool":
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(f"--{f.name}", action=action, default=argparse.SUPPRESS, help=text)
        else:
            metavar = "{" + ",".join(map(str, shown[f.name])) + "}" if f.name in shown else None
            p.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type],
                           default=argparse.SUPPRESS, choices=choices.get(f.name), metavar=metavar, help=text)
    return p


def field_help(cls) -> dict[str, str]:
    """{field: its comment} of a dataclass whose fields are commented as `name: type = value  # text`
    (a following comment-only line continues the text): the --help of each flag."""
    import inspect
    import io
    import tokenize

    helps, last = {}, None
    if dataclasses.is_dataclass(cls.__base__):  # a config built on another: the base's fields first
        helps.update(field_help(cls.__base__))
    lines = inspect.getsource(cls).splitlines()
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines)).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row = lines[tok.start[0] - 1]
        text = tok.string.lstrip("#").strip()
        code = row[: tok.start[1]].strip()
        if code and ":" in code:  # a field's own comment
            last = code.split(":")[0].strip()
            helps[last] = text
        elif not code and last and tok.string.startswith("#  "):
            helps[last] += " " + text  # a continuation: its text indented under the field's
        else:
            last = None  # a section comment
    return helps
