"""Builds and loads `cpu_kernels.c`: the compiled kernels of a CPU training step (dropout,
GELU+dropout, softmax+dropout, residual add + dropout + LayerNorm, attention, S4 kernel and
convolution). GELU+dropout, the residual LayerNorm and attention can also add the bias of the
Linear layer before them and sum its gradient.

Why our own kernels: with dropout 0.1 active, a training step of the agnostic network at
d_model 64 spent a third of its time drawing, converting and applying dropout masks, and GELU's
backward re-reads its input in another pass. torch has no fused CPU dropout (its Bernoulli sampler
is ~7 ns per element), and `torch.compile` of the network was not faster on this CPU (and takes
minutes to compile). The kernels are plain C (no torch headers): compiled once per machine with the
system C compiler in well under a second, cached under ``$XDG_CACHE_HOME/rl_agnostic`` (key: source
hash, compiler, CPU flags — a cache shared by different CPUs never loads code built for another),
and called through ctypes, which releases the GIL. Their loops run on torch's own OpenMP threads
when the library can share torch's runtime (`OPENMP_FLAGS`), else on the calling thread. Without
a compiler, or with ``RL_AGNOSTIC_NATIVE=0``, `kernels()` returns None and callers use the
torch/numpy path.

`keep_freed_memory` tunes glibc's allocator for the same reason: glibc returns every freed block
above its (dynamic) mmap threshold to the OS, so each training step's activations (hundreds of KB
to MBs each) came back as fresh pages: ~40k page faults and ~15 % of the CPU time of a d_model 64
HalfCheetah step went to the kernel zeroing pages.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fcx-limited-range",
         "-fopenmp-simd", "-fPIC", "-shared", "-std=gnu99"]
if platform.machine().lower() in ("x86_64", "amd64"):
    # gcc's tuning for Intel server CPUs keeps loops at 256-bit vectors; on an AVX-512 Xeon the
    # 512-bit ones ran the LayerNorm and GELU+dropout kernels 10-15 % faster (no effect without
    # AVX-512; an x86-only option).
    FLAGS.insert(2, "-mprefer-vector-width=512")
# With OpenMP the kernels split their loops among threads. The library asks for `libgomp.so.1`,
# the soname of the libgomp torch ships and has already loaded, so the loader binds it to torch's
# runtime: the same threads (and thread count, `torch.set_num_threads`) as torch's own CPU ops,
# which are spinning on the other cores between ops anyway. A second OpenMP runtime would make
# the two thread pools fight for the cores: `kernels()` checks for it and then loads the
# single-threaded build instead.
OPENMP_FLAGS = ["-fopenmp"]
_OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")

_F32P = ctypes.c_void_p  # data_ptr() of a contiguous float32 array (or None for an optional one)
_I64 = ctypes.c_int64
_MASK = [ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float]  # seed, keep threshold, 1/(1-p)
_SIGNATURES = {
    # arrays, element count, mask
    "rla_dropout": [_F32P, _F32P, _I64, *_MASK],
    "rla_gelu_dropout": [_F32P, _F32P, _I64, *_MASK],
    "rla_gelu_dropout_backward": [_F32P, _F32P, _F32P, _I64, *_MASK],
    # arrays, rows, columns, mask
    "rla_bias_gelu_dropout": [*[_F32P] * 3, _I64, _I64, *_MASK],
    "rla_bias_gelu_dropout_backward": [*[_F32P] * 5, _I64, _I64, *_MASK],
    # arrays, rows, features, glu (0/1), (eps), mask
    "rla_add_dropout_layernorm": [*[_F32P] * 8, _I64, _I64, _I64, ctypes.c_float, *_MASK],
    "rla_add_dropout_layernorm_backward": [*[_F32P] * 11, _I64, _I64, _I64, *_MASK],
    # arrays, scratch blocks, batch, length, channels, scale, mask
    "rla_attention": [*[_F32P] * 6, _I64, _I64, _I64, _I64, ctypes.c_float, *_MASK],
    "rla_attention_backward": [*[_F32P] * 7, _I64, _I64, _I64, _I64, ctypes.c_float, *_MASK],
    # arrays, rows, row length, score scale, mask
    "rla_softmax_dropout": [*[_F32P] * 3, _I64, _I64, ctypes.c_float, *_MASK],
    "rla_softmax_dropout_backward": [*[_F32P] * 3, _I64, _I64, ctypes.c_float, *_MASK],
    # arrays, channels, modes, length, zoh (0/1)
    "rla_ssm_full_kernel": [*[_F32P] * 6, _I64, _I64, _I64, _I64],
    "rla_ssm_full_kernel_backward": [*[_F32P] * 11, _I64, _I64, _I64, _I64],
    # arrays, batch, length, channels
    "rla_causal_conv": [*[_F32P] * 3, _I64, _I64, _I64],
    "rla_causal_conv_backward": [*[_F32P] * 5, _I64, _I64, _I64, _I64],  # + accumulate du
}


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("flags", "model name", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "rl_agnostic"


def _build(compiler: str, flags: list[str]) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode() + " ".join(flags).encode()
                         + _cpu_signature().encode()).hexdigest()[:16]
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / f"rl_agnostic_{os.getuid()}"):
        target = directory / f"cpu_kernels_{key}.so"
        if target.is_file():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
        except OSError:
            continue
        try:
            subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, target)  # atomic: concurrent builders (Ray actors) never see half a file
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError("no writable cache directory for the compiled kernels")


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc serve blocks up to 32 MB from its heap and keep up to 1 GB of freed memory
    for reuse instead of unmapping it (the usual advice for PyTorch on CPU, without preloading
    another allocator). Once per process; False where there is no glibc ``mallopt`` or when
    ``RL_AGNOSTIC_MALLOC_TUNING=0``."""
    if os.environ.get("RL_AGNOSTIC_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(_M_MMAP_THRESHOLD, 32 << 20), mallopt(_M_TRIM_THRESHOLD, 1 << 30),
                mallopt(_M_TOP_PAD, 64 << 20)])


def openmp_runtimes() -> set[str]:
    """Files of the OpenMP runtimes mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    paths = {line.split()[-1] for line in maps.splitlines() if "/" in line}
    return {p for p in paths if Path(p).name.startswith(_OPENMP_RUNTIMES)}


@lru_cache(maxsize=1)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library (multi-threaded when it shares torch's OpenMP runtime), or None
    when it cannot be built here."""
    if os.environ.get("RL_AGNOSTIC_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    import torch  # noqa: F401  (its OpenMP runtime must be loaded first; see OPENMP_FLAGS)

    lib, error = None, None
    before = openmp_runtimes()
    for flags in ([*FLAGS, *OPENMP_FLAGS], FLAGS):
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags)))
        except (OSError, subprocess.SubprocessError) as exc:
            error = exc
            continue
        if flags is FLAGS or (before and len(openmp_runtimes()) == 1):
            break
        lib = None  # a second OpenMP runtime (or none to share): take the single-threaded build
    if lib is None:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"rl_agnostic: fused CPU kernels unavailable, using the torch path ({detail})",
                      RuntimeWarning, stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    lib.rla_sum_squares.argtypes = [ctypes.c_void_p, ctypes.c_void_p, _I64]
    lib.rla_sum_squares.restype = ctypes.c_double
    lib.rla_set_flush_denormal.argtypes = [ctypes.c_int]
    lib.rla_set_flush_denormal.restype = ctypes.c_int
    return lib


def flush_denormals(enable: bool = True) -> int:
    """Treat subnormal floats (|x| < 1.18e-38) as zero — flush-to-zero and denormals-are-zero —
    on this thread and on every thread of the OpenMP pool that torch's ops, MKL and the kernels
    run on, as TensorFlow does on CPU by default; ``enable=False`` restores IEEE behaviour.

    Why: x86 CPUs compute with subnormal operands in microcode, ~100x slower per operation. In
    the network benchmark's PPO updates of the Gaussian policy at d_model 256 (HalfCheetah's
    shapes), 59 % of all gradients were below 1e-19 after a dozen updates (the actor encoder's
    largest about 1e-8), so their squares in the gradient norm, and products in the backward
    matmuls, are subnormal: with the flush the whole step measured 7 % faster (three runs each,
    side by side) and the gradient-norm clip 2.3x faster. What is computed changes only below
    1.18e-38.

    Training entry points call this (the PPO learner, the offline trainer, the network benchmark);
    ``RL_AGNOSTIC_FLUSH_DENORMAL=0`` leaves the floating-point mode alone. Threads that join the
    pool later (a larger ``torch.set_num_threads``) start in IEEE mode: call again after it.
    Returns the number of threads set (0: disabled, or not an x86 CPU).
    """
    if os.environ.get("RL_AGNOSTIC_FLUSH_DENORMAL", "1") == "0":
        return 0
    import torch

    supported = torch.set_flush_denormal(enable)  # the calling thread, also without the kernels
    lib = kernels()
    return lib.rla_set_flush_denormal(int(enable)) if lib is not None else int(supported)
