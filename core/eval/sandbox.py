"""Run untrusted generated code: a subprocess in a temp dir with CPU-time, memory, file-size and
process limits, no network (sockets disabled; a private network namespace where `unshare` works)
and a minimal environment. Returns whether it exited cleanly within the limits."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_GUARD = """\
import socket as _s, subprocess as _sp, os as _os, builtins as _b, shutil as _sh
def _deny(*a, **k):
    raise PermissionError("disabled in the localcoder sandbox")
_s.socket = _s.create_connection = _s.socket_pair = _deny
_sp.Popen = _sp.run = _sp.call = _sp.check_output = _deny
for _n in ("system", "kill", "fork", "forkpty", "killpg", "rmdir", "removedirs", "unlink", "remove", "putenv", "chdir"):
    setattr(_os, _n, _deny)
_sh.rmtree = _sh.move = _deny
del _s, _sp, _os, _sh, _n
"""


@dataclass
class RunResult:
    passed: bool
    detail: str  # "passed" | "failed: ..." | "timeout" | ...


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:
        os.setsid()
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _netns_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if not unshare:
        return []
    try:
        ok = subprocess.run([unshare, "--net", "--map-root-user", "true"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [unshare, "--net", "--map-root-user"] if ok.returncode == 0 else []


_NETNS: list[str] | None = None


def run_program(code: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> RunResult:
    global _NETNS
    if _NETNS is None:
        _NETNS = _netns_prefix()
    with tempfile.TemporaryDirectory(prefix="localcoder-sandbox-") as tmp:
        script = os.path.join(tmp, "program.py")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(_GUARD + "\n" + code)
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": tmp, "LANG": "C.UTF-8"}
        cmd = _NETNS + [sys.executable, "-I", "-S", script]
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, timeout=timeout_s, text=True,
                                  preexec_fn=_limits(memory_mb, int(timeout_s) + 1), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return RunResult(False, "timeout")
        if proc.returncode == 0:
            return RunResult(True, "passed")
        err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return RunResult(False, f"failed: {err[:200]}")
