"""Which llama.cpp CPU kernels a process loads (localcoder.engines.native): the choice, its errors, the CLI."""

import json

import pytest

from localcoder import cli
from localcoder.engines import native
from localcoder.errors import InvalidRequest

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse sse2 avx avx2 fma f16c {extra}
bugs\t\t: spectre_v1
"""
AVX512_CPU = CPUINFO.format(extra=" ".join(sorted(native.AVX512.cpu_flags - {"avx2", "fma", "f16c"})))
AVX2_CPU = CPUINFO.format(extra="bmi2")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALCODER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(native, "llama_version", lambda: "9.9.9")
    return tmp_path / "home"


def fake_build(home, version="9.9.9", flags=None):
    folder = home / "kernels" / f"{version}-avx512"
    folder.mkdir(parents=True)
    (folder / "libllama.so").write_bytes(b"\x7fELF")
    stamp = {"version": version, "flags": list(native.AVX512.cmake_flags if flags is None else flags)}
    (folder / "BUILT.json").write_text(json.dumps(stamp))
    return folder


def test_cpu_flags_are_read_from_cpuinfo():
    flags = native.cpu_flags(AVX2_CPU)
    assert {"avx2", "fma", "bmi2"} <= flags and "avx512f" not in flags
    assert native.cpu_flags("processor: 0\n") == frozenset()


ZEN4_CPU = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
flags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2 avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512_bf16 \
avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq
"""


def test_an_amd_zen4_without_avx_vnni_runs_the_avx512_set(home, tmp_path):
    """Zen 4 has AVX-512 VNNI and BF16 but not AVX-VNNI (the 256-bit VEX form): the set must neither require
    it nor compile it in (a VEX vpdpbusd would be an illegal instruction there)."""
    pip = tmp_path / "pip-libs"
    pip.mkdir()
    folder = fake_build(home)
    assert "avx_vnni" not in native.cpu_flags(ZEN4_CPU)
    assert native.choose("auto", native.cpu_flags(ZEN4_CPU), pip) == ("avx512", folder)
    assert not any("AVX_VNNI" in flag for flag in native.AVX512.cmake_flags)


def test_auto_picks_the_avx512_set_only_when_the_cpu_runs_it_and_it_is_built(home, tmp_path):
    pip = tmp_path / "pip-libs"
    pip.mkdir()
    assert native.choose("auto", native.cpu_flags(AVX512_CPU), pip) == ("portable", None)  # not built yet
    folder = fake_build(home)
    assert native.choose("auto", native.cpu_flags(AVX512_CPU), pip) == ("avx512", folder)
    assert native.choose("auto", native.cpu_flags(AVX2_CPU), pip) == ("portable", None)  # built, CPU lacks it
    assert native.choose("portable", native.cpu_flags(AVX512_CPU), pip) == ("portable", None)


def test_auto_keeps_a_gpu_build_of_llama_cpp(home, tmp_path):
    """make serve CMAKE_ARGS=-DGGML_CUDA=on: pip's libraries hold the CUDA backend; CPU kernels must not replace them."""
    fake_build(home)
    pip = tmp_path / "pip-libs"
    pip.mkdir()
    (pip / "libggml-cuda.so").write_bytes(b"")
    (pip / "libggml-cpu.so").write_bytes(b"")
    assert native.gpu_backends(pip) == ["libggml-cuda.so"]
    assert native.choose("auto", native.cpu_flags(AVX512_CPU), pip) == ("portable", None)


def test_a_build_for_other_flags_or_another_version_is_not_used(home):
    fake_build(home, flags=["-DGGML_AVX512=ON"])
    assert native.built(native.AVX512) is None
    assert native.built(native.AVX512, version="9.9.9") is None
    fake_build(home, version="1.0.0")
    assert native.built(native.AVX512) is None  # the installed bindings are 9.9.9


def test_asking_for_avx512_says_why_it_cannot_load(home):
    with pytest.raises(InvalidRequest) as exc:
        native.choose("avx512", native.cpu_flags(AVX2_CPU))
    assert exc.value.param == "kernels" and "avx512f" in str(exc.value)
    with pytest.raises(InvalidRequest) as exc:
        native.choose("avx512", native.cpu_flags(AVX512_CPU))
    assert "not built" in str(exc.value) and "models kernels --build" in str(exc.value)
    with pytest.raises(InvalidRequest) as exc:
        native.choose("fastest", native.cpu_flags(AVX512_CPU))
    assert exc.value.param == "kernels"


def test_a_process_cannot_switch_kernels_once_loaded(monkeypatch):
    monkeypatch.setattr(native, "_loaded", {"kernels": "portable", "path": "/x"})
    with pytest.raises(InvalidRequest) as exc:
        native.import_llama("avx512")
    assert "already runs the portable kernels" in str(exc.value)
    assert native.import_llama("auto") is native.import_llama("portable")  # the loaded set serves both


def test_kernels_command_lists_the_sets_and_skips_a_cpu_without_avx512(home, monkeypatch, capsys):
    real = native.cpu_flags
    monkeypatch.setattr(native, "cpu_flags", lambda cpuinfo=None: real(AVX2_CPU))
    assert cli.main(["models", "kernels", "--json"]) == 0
    rows = {r["kernels"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["avx512"]["built"] == "no" and rows["avx512"]["cpu"].startswith("no: lacks avx512")
    assert cli.main(["models", "kernels", "--build"]) == 0
    out = capsys.readouterr().out
    assert "avx512: not built, this CPU lacks" in out
    assert not (home / "kernels").exists()  # nothing was built or half-written


def test_the_config_knows_the_kernels_field():
    from localcoder.config import ModelConfig

    assert ModelConfig().kernels == "auto"
    assert set(native.KERNELS) == {"auto", "portable", "avx512"}


def test_a_failed_build_is_a_clear_error_and_leaves_nothing_that_passes_for_a_build(home, tmp_path, monkeypatch,
                                                                                    capsys):
    real = native.cpu_flags
    monkeypatch.setattr(native, "cpu_flags", lambda cpuinfo=None: real(AVX512_CPU))
    monkeypatch.setattr(native, "pip_libs", lambda: None)
    monkeypatch.setattr(native, "source", lambda version=None: tmp_path)
    fake_cmake = tmp_path / "cmake"
    fake_cmake.write_text("#!/bin/sh\necho 'CMake Error: no compiler' >&2\nexit 3\n")
    fake_cmake.chmod(0o755)
    monkeypatch.setattr(native, "cmake", lambda: str(fake_cmake))
    assert cli.main(["models", "kernels", "--build", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cmake failed (exit 3)" in err and ".cmake.log" in err
    log = next((home / "kernels").glob("*.cmake.log"))
    assert "no compiler" in log.read_text()
    assert native.built(native.AVX512) is None and native.choose("auto", real(AVX512_CPU)) == ("portable", None)


def test_the_choice_does_not_leak_into_child_processes():
    """The library folder is set in the environment for the import only: a server or worker this process starts
    picks its own kernels (a leaked LLAMA_CPP_LIB_PATH passed for the user's own and overrode a child's
    `--kernels portable`)."""
    import os
    import subprocess
    import sys

    code = ("import json, os; from localcoder.engines import native; native.import_llama(); "
            "print(json.dumps([native.loaded(), os.environ.get('LLAMA_CPP_LIB_PATH')]))")
    env = {k: v for k, v in os.environ.items() if k not in ("LLAMA_CPP_LIB_PATH", "LOCALCODER_KERNELS")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded, leaked = json.loads(r.stdout.strip().splitlines()[-1])
    assert leaked is None and loaded["kernels"] in ("portable", "avx512")
