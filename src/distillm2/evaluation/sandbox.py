"""Run untrusted model-written code (HumanEval completions) in a separate, limited process.

Each program runs in a fresh Python interpreter (isolated mode, empty environment) in a
throw-away working directory, with limits on CPU time, address space, file size, open files and
processes, a wall-clock timeout that kills its whole process group, and a runtime audit hook
(PEP 578, installed before the program is compiled, so the program cannot remove it) that refuses:
network sockets, starting processes, and any file write, delete or rename outside the working
directory. The directory is removed afterwards. This is defence in depth for benchmark code, not
a security boundary against a determined attacker (ctypes could still poke memory); run untrusted
evaluations inside a container or VM as well.

A program passes only when it runs to its end: after the program returns, the runner prints a
random token chosen for that run, and a pass needs that token as the last line of its output
and exit status 0. A program that leaves early with ``sys.exit(0)`` or ``os._exit(0)`` (before
its tests ran) therefore fails, as in the reference HumanEval harness.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The runner: install the audit hook, then exec the program read from stdin.
_RUNNER = r"""
import os, sys
ROOT = os.path.realpath(os.getcwd())
def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else ROOT)
    except Exception:
        return False
    return p == ROOT or p.startswith(ROOT + os.sep)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_BLOCKED = {"socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "subprocess.Popen",
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
            "os.killpg", "pty.spawn", "ctypes.dlopen", "os.chdir", "os.chroot", "os.setuid"}
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link", "os.chmod",
                "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
def _hook(event, args):
    if event in _BLOCKED or event.startswith("socket.") and event != "socket.__new__" or event.startswith("os.exec"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "socket.__new__":
        raise PermissionError("sandbox: network access is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} on {a!r} outside the working directory")
sys.addaudithook(_hook)
def _main(sentinel=sys.stdin.readline().strip()):
    exec(compile(sys.stdin.read(), "<program>", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    os.write(1, ("\n" + sentinel + "\n").encode())
_main()
"""


@dataclass
class Outcome:
    """How a program run ended."""

    passed: bool
    status: str  # "passed", "failed", "timeout", "error"
    detail: str = ""


def _limits(cpu_seconds: int, memory_bytes: int):
    def apply():
        os.setsid()  # own process group: the timeout kills everything it started
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 2**20, 10 * 2**20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Execute ``source`` as a Python program under the limits above. Passed = it ran to its
    end (the run's token printed after it returned) with exit status 0 within ``timeout``
    seconds."""
    sentinel = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="distillm2-sandbox-")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _RUNNER], cwd=workdir, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "HOME": workdir},
            preexec_fn=_limits(int(timeout) + 1, memory_mb * 2**20),
        )
        try:
            out, err = proc.communicate(f"{sentinel}\n{source}".encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout", f"no result within {timeout} s")
        finished = out.decode(errors="replace").rstrip().endswith(sentinel)
        if proc.returncode == 0 and finished:
            return Outcome(True, "passed")
        if proc.returncode == 0:
            return Outcome(False, "failed", "the program exited before its end (sys.exit / os._exit)")
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return Outcome(False, "failed", tail[0][:300])
    except OSError as err:
        return Outcome(False, "error", str(err))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(sources: list[str], timeout: float = 10.0, memory_mb: int = 1024,
                 workers: int | None = None) -> list[Outcome]:
    """:func:`run_program` over ``sources``, ``workers`` at a time (default: one per CPU), in
    order."""
    workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda s: run_program(s, timeout, memory_mb), sources))
