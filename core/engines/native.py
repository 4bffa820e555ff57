"""Which llama.cpp CPU kernels this process runs: the portable AVX2 build pip installed, or an AVX-512 set.

The Makefile builds llama-cpp-python for a portable AVX2 baseline (a ``-march=native`` build picked up AMX
kernels that crashed in some VMs, and pip's cached wheel must run on every machine of this kind). On a CPU
with AVX-512 VNNI/BF16 that costs ~1.45x in prefill (docs/latency.md). So ``make serve`` also builds the same
vendored llama.cpp a second time with AVX-512 (AMX still off) into ``$LOCALCODER_HOME/kernels/<version>-avx512``
(``localcoder models kernels --build``), and the process loads it through llama-cpp-python's
``LLAMA_CPP_LIB_PATH`` when the CPU has the instructions (``ModelConfig.kernels``).

``import_llama`` is the one place that imports ``llama_cpp``: the shared libraries load once per process, so
the first import decides. Nothing here imports ``llama_cpp`` at module import time.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from typing import get_args

from localcoder.config import Kernels
from localcoder.errors import BackendUnavailable, InvalidRequest, LocalcoderError

PACKAGE = "llama-cpp-python"
KERNELS: tuple[str, ...] = get_args(Kernels)
PORTABLE_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                  "-DGGML_BMI2=ON", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_BF16=OFF")


@dataclass(frozen=True)
class KernelSet:
    name: str
    cpu_flags: frozenset[str]  # /proc/cpuinfo flags the kernels execute
    cmake_flags: tuple[str, ...]


# No AVX-VNNI (the 256-bit VEX form): every ggml path that would use it takes AVX512-VNNI + VL first, so on an
# Intel CPU with both the code is the same, and an AMD Zen 4 (AVX-512 VNNI/BF16, no AVX-VNNI) can run the set.
AVX512 = KernelSet(
    "avx512",
    frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni",
               "avx512_bf16"}),
    PORTABLE_FLAGS + ("-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"),
)
SETS = {AVX512.name: AVX512}


def best_set(flags: frozenset[str] | None = None) -> KernelSet | None:
    """The fastest set this CPU executes (None: the portable kernels)."""
    flags = cpu_flags() if flags is None else flags
    return next((k for k in SETS.values() if k.cpu_flags <= flags), None)


def peer_flags() -> str:
    """CMake flags for the bench's llama-server peer (tests/setup.d/llama_server.sh): the kernels ``kernels auto``
    serves with on this machine, so that the peer and localcoder run the same code."""
    kset = best_set()
    return " ".join(kset.cmake_flags if kset else (*PORTABLE_FLAGS, "-DGGML_AVX512=OFF"))

_loaded: dict[str, str] = {}  # "kernels" -> the set this process loaded, "path" -> its library folder


class KernelsBuildError(LocalcoderError):
    pass


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux ``/proc/cpuinfo``; empty elsewhere: portable kernels)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def llama_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BackendUnavailable("the llama.cpp engine needs llama-cpp-python",
                                 hint="pip install 'localcoder[llama]'") from exc


def kernels_home() -> Path:
    from localcoder.models import home

    return home() / "kernels"


def set_dir(kset: KernelSet, version: str | None = None) -> Path:
    return kernels_home() / f"{version or llama_version()}-{kset.name}"


def built(kset: KernelSet, version: str | None = None) -> Path | None:
    """The folder of a complete build of ``kset`` for the installed llama-cpp-python, or None."""
    folder = set_dir(kset, version)
    try:
        stamp = json.loads((folder / "BUILT.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = stamp.get("version") == (version or llama_version()) and stamp.get("flags") == list(kset.cmake_flags)
    return folder if ok and (folder / "libllama.so").exists() else None


def pip_libs() -> Path | None:
    """The folder of the libraries pip built into the llama_cpp package (found without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def gpu_backends(libs: Path | None) -> list[str]:
    """GPU backends compiled into pip's build (``CMAKE_ARGS=-DGGML_CUDA=on``): those must not be swapped for CPU
    kernels."""
    if libs is None or not libs.is_dir():
        return []
    return sorted(p.name for p in libs.glob("libggml-*.so*") if p.name.split(".")[0].removeprefix("libggml-")
                  in ("cuda", "hip", "vulkan", "sycl", "metal", "opencl", "musa", "cann"))


def choose(kernels: str, flags: frozenset[str] | None = None, libs: Path | None = None) -> tuple[str, Path | None]:
    """(the set to load, its folder; None = the libraries pip built inside the llama_cpp package).

    auto: AVX-512 when this CPU executes it, it is built for this llama-cpp-python and pip's build has no GPU
    backend; else portable. avx512: that set, or a clear error saying why not."""
    if kernels not in KERNELS:
        raise InvalidRequest(f"kernels must be one of {', '.join(KERNELS)}", param="kernels")
    if kernels == "portable":
        return "portable", None
    flags = cpu_flags() if flags is None else flags
    missing = AVX512.cpu_flags - flags
    folder = built(AVX512) if not missing else None
    if kernels == "auto":
        gpu = gpu_backends(pip_libs() if libs is None else libs)
        return ("avx512", folder) if folder and not gpu else ("portable", None)
    if missing:
        raise InvalidRequest(f"kernels avx512: this CPU lacks {', '.join(sorted(missing))}", param="kernels")
    if folder is None:
        raise InvalidRequest("kernels avx512: not built for llama-cpp-python " + llama_version(),
                             param="kernels", hint="localcoder models kernels --build")
    return "avx512", folder


def import_llama(kernels: str | None = None):
    """``import llama_cpp`` with the chosen kernels (``ModelConfig.kernels``; None: ``LOCALCODER_KERNELS`` or
    auto). A user's own ``LLAMA_CPP_LIB_PATH`` wins. Once loaded, a later call asking for another set is an error
    (the libraries cannot be swapped inside a process)."""
    if "kernels" not in _loaded:
        try:
            llama_version()
            chosen = kernels or os.environ.get("LOCALCODER_KERNELS") or "auto"
            folder = None
            if "llama_cpp" not in sys.modules and not os.environ.get("LLAMA_CPP_LIB_PATH"):
                folder = choose(chosen)[1]
            llama_cpp = _import_from(folder)
            if llama_cpp is None:  # a broken build (files removed, another glibc): say so, or serve portable
                if chosen != "auto":
                    raise BackendUnavailable(f"the {chosen} kernels in {folder} do not load",
                                             hint="localcoder models kernels --build --force, or --kernels portable")
                warnings.warn(f"the kernels in {folder} do not load; serving the portable ones "
                              "(rebuild: localcoder models kernels --build --force)", stacklevel=2)
                llama_cpp = _import_from(None)
        except ImportError as exc:  # the [llama] extra is not installed
            raise BackendUnavailable("the llama.cpp engine needs llama-cpp-python",
                                     hint="pip install 'localcoder[llama]'") from exc
        _loaded.update(_identify(Path(llama_cpp.llama_cpp._lib._name).resolve().parent))  # what really loaded
    if kernels not in (None, "auto", _loaded["kernels"]) and _loaded["kernels"] != "custom":
        raise InvalidRequest(f"kernels {kernels}: this process already runs the {_loaded['kernels']} kernels",
                             param="kernels", hint="start another process for the other kernels")
    import llama_cpp

    return llama_cpp


def _import_from(folder: Path | None):
    """``import llama_cpp`` with its libraries from ``folder`` (None: pip's); None when they do not load.
    ``LLAMA_CPP_LIB_PATH`` is set for the import only: child processes (servers the bench starts, the checked
    sandbox) choose their own kernels."""
    if folder is not None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(folder)
    try:
        import llama_cpp
    except (RuntimeError, OSError):  # llama-cpp-python raises RuntimeError("Failed to load shared library ...")
        if folder is None:
            raise
        for name in [m for m in sys.modules if m == "llama_cpp" or m.startswith("llama_cpp.")]:
            del sys.modules[name]  # the half-imported package, so that the next import starts over
        return None
    finally:
        if folder is not None:
            os.environ.pop("LLAMA_CPP_LIB_PATH", None)
    return llama_cpp


def _identify(folder: Path) -> dict[str, str]:
    pip = pip_libs()
    if pip is not None and folder == pip.resolve():
        return {"kernels": "portable", "path": str(folder)}
    for kset in SETS.values():
        if folder == set_dir(kset).resolve():
            return {"kernels": kset.name, "path": str(folder)}
    return {"kernels": "custom", "path": str(folder)}


def loaded() -> dict[str, str]:
    """The kernels this process loaded (for /health and the bench): {"kernels": ..., "path": ...} or {}."""
    return dict(_loaded)


# -- building ------------------------------------------------------------------------------------------------


def status(flags: frozenset[str] | None = None) -> list[dict]:
    flags = cpu_flags() if flags is None else flags
    gpu = gpu_backends(pip_libs())
    rows = [{"kernels": "portable" + (f" + {', '.join(gpu)}" if gpu else ""),
             "cpu": "yes" if {"avx2", "fma", "f16c"} <= flags else "no", "built": "yes (pip)", "path": str(pip_libs())}]
    for kset in SETS.values():
        missing = sorted(kset.cpu_flags - flags)
        folder = built(kset)
        rows.append({"kernels": kset.name, "cpu": "yes" if not missing else "no: lacks " + " ".join(missing),
                     "built": "yes" if folder else "no", "path": str(folder or set_dir(kset))})
    return rows


def build(kset: KernelSet, *, progress: bool = True, jobs: int = 0, force: bool = False) -> Path:
    """Build ``kset`` from the llama.cpp that llama-cpp-python's sdist vendors (the same source, so the ABI the
    bindings expect), ~2 min on 2 cores. Idempotent: an existing complete build is reused; one process builds at
    a time (``make serve`` and ``make test`` side by side)."""
    from localcoder.models import _exclusive

    version = llama_version()
    if not force and (done := built(kset, version)):
        return done
    kernels_home().mkdir(parents=True, exist_ok=True)
    with _exclusive(kernels_home() / f".{kset.name}.lock"):
        if not force and (done := built(kset, version)):  # the other process built it while this one waited
            return done
        return _build(kset, version, progress=progress, jobs=jobs)


def _build(kset: KernelSet, version: str, *, progress: bool, jobs: int) -> Path:
    out = set_dir(kset, version)
    work = kernels_home() / f".build-{version}-{kset.name}"
    free = shutil.disk_usage(kernels_home()).free
    if free < 1 << 30:
        raise KernelsBuildError(f"not enough disk to build the {kset.name} kernels: {free >> 20} MB free, ~1 GB needed",
                                hint="free some space, or set LOCALCODER_HOME to a larger disk")
    src = source(version)
    cmake_bin = cmake()
    jobs = jobs or int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or 0) or (os.cpu_count() or 1)
    configure = [cmake_bin, "-S", str(src / "vendor" / "llama.cpp"), "-B", str(work), "-DCMAKE_BUILD_TYPE=Release",
                 *kset.cmake_flags, "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF",
                 # the libraries find each other beside themselves once copied out of the build tree
                 "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN"]
    _run(configure, work.with_suffix(".cmake.log"))
    _compile([cmake_bin, "--build", str(work), "--target", "llama", "-j", str(jobs)], work.with_suffix(".build.log"),
             f"{kset.name} kernels", progress)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    libs = sorted((work / "bin").glob("lib*.so*"))
    if not any(p.name == "libllama.so" for p in libs):
        raise KernelsBuildError(f"the {kset.name} build made no libllama.so (see {work.with_suffix('.build.log')})")
    for lib in libs:  # keep the soname links: libllama.so -> libllama.so.0 -> libllama.so.0.5.0
        target = staging / lib.name
        if lib.is_symlink():
            target.symlink_to(os.readlink(lib))
        else:
            shutil.copy2(lib, target)
    (staging / "BUILT.json").write_text(json.dumps({"version": version, "flags": list(kset.cmake_flags)}) + "\n",
                                         encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def source(version: str | None = None) -> Path:
    """llama-cpp-python's sdist (from PyPI, cached), unpacked; its vendor/llama.cpp is what pip compiled (the
    bench's llama-server is built from it too: tests/setup.d/llama_server.sh)."""
    version = version or llama_version()
    root = kernels_home().parent / "llama-src"
    src = root / f"llama_cpp_python-{version}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-binary", ":all:",
              "--no-deps", "-d", str(root), f"{PACKAGE}=={version}"], root / "download.log")
    partial = root / f".unpack-{os.getpid()}"  # a killed unpack never passes for a source tree
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(partial, filter="data")
    shutil.rmtree(src, ignore_errors=True)
    (partial / src.name).rename(src)
    shutil.rmtree(partial, ignore_errors=True)
    return src


def cmake() -> str:
    """A cmake: the system's, the venv's, or PyPI's wheel installed into the venv."""
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if found:
        return found
    _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "cmake"],
         kernels_home() / "cmake-install.log")
    found = shutil.which("cmake", path=str(Path(sys.executable).parent))
    if not found:
        raise KernelsBuildError("cmake is needed to build the kernels and could not be installed",
                                hint="install cmake (pip install cmake)")
    return found


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        raise KernelsBuildError(f"{Path(cmd[0]).name} failed (exit {rc}); its output is in {log}")


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _compile(cmd: list[str], log: Path, desc: str, progress: bool) -> None:
    """The build, with a bar that follows CMake's ``[ 42%]`` lines (rate and ETA in percent)."""
    from tqdm import tqdm

    with log.open("w") as fh, tqdm(total=100, desc=desc, unit="%", file=sys.stderr, disable=not progress) as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if (m := _PERCENT.match(line)) and int(m.group(1)) > bar.n:
                bar.update(int(m.group(1)) - bar.n)
        rc = proc.wait()
    if rc:
        raise KernelsBuildError(f"building the kernels failed (exit {rc}); its output is in {log}")
