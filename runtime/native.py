"""A small C kernel for the linear stand-ins on CPU, compiled on first use.

At batch 1 on CPU, a layer's linear stand-ins cost what reading each dropped slot's two low-rank
factors from memory costs (about 20 us per slot of [512, 56] and [56, 512] float32 factors), and
stock torch has no op that reads fewer bytes at the same rate: its half-precision matrix-vector
forms are slower than float32 for one of the two shapes, and its gathers stream at a fraction of
the rate. ``native/standins_f16.c`` reads the factors in half precision, every dropped slot's
together, and adds the weighted stand-ins in one call (``StandIns.add_dropped_native``). A few tokens
(batched decode) go through it token by token in one call; more (prefill) through its grouped form,
which takes the dropped pairs sorted by expert and reads each row of an expert's factors once for a
block of 4 of its pairs, with their accumulators in registers (``StandIns.add_dropped_native_grouped``).

The same library holds batched decode's routing step (``native/alloc_t_few.c``): Alloc-T's selection over a few
tokens and the rewrite of their routing, each one call where the Python and torch forms pay a fixed cost per
number or per op (``routing_rules.alloc_t_keep_few_native``, ``routing_rules.rewrite_few_native``). They only
compare, copy and multiply by the gain, so their results are those forms' bit for bit. And decoding's routed
experts (``native/experts_few.c``, up to 16 tokens of float32 SwiGLU experts): every pair in one call, each
expert's weights read once for its pairs, where torch's ``grouped_mm`` on CPU runs one matmul per expert, rows
or none; the same sums up to float rounding.

The kernel is an optimisation, never a requirement. It is built with the system C compiler into a
per-user cache, once per source and compiler, and used only on x86-64 Linux CPUs with AVX2, FMA and
F16C. Anywhere else, or when the build fails, or with ``ALLOCPLAN_NATIVE=0``, the torch forms run instead
(for the stand-ins, the torch loop ``StandIns.add_dropped_one_token``): the same sums up to the order of float
additions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable

SOURCE = Path(__file__).with_name("native") / "standins_f16.c"
# Compiled into the same library: Alloc-T's selection over a few tokens (``alloc_t_few``, batched decode).
ROUTING_SOURCE = Path(__file__).with_name("native") / "alloc_t_few.c"
# And a few tokens' routed experts (``experts_few``, batched decode; runtime/experts.py's ``_native_few_experts``).
EXPERTS_SOURCE = Path(__file__).with_name("native") / "experts_few.c"
SOURCES = (SOURCE, ROUTING_SOURCE, EXPERTS_SOURCE)
# Only the instruction sets the kernel uses, not -march=native: the cached library must run on any CPU
# that passes _cpu_supported, whichever machine built it.
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared")
_CPU_FLAGS = frozenset({"avx2", "fma", "f16c"})
# ALLOCPLAN_NATIVE=0 switches the kernel off (the torch loop runs); ALLOCPLAN_CACHE_DIR moves the cache.
ENV_SWITCH = "ALLOCPLAN_NATIVE"
ENV_CACHE = "ALLOCPLAN_CACHE_DIR"
_BUILD_TIMEOUT_S = 120


def _cpu_supported() -> bool:
    """x86-64 Linux with the instruction sets FLAGS names (read from /proc/cpuinfo)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return _CPU_FLAGS <= set(line.split(":", 1)[1].split())
    except OSError:
        return False
    return False


def _compiler() -> str | None:
    """The C compiler: $CC, else cc or gcc on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


def _cache_dir() -> Path:
    """$ALLOCPLAN_CACHE_DIR, else $XDG_CACHE_HOME/allocplan, else ~/.cache/allocplan."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "allocplan"


def _writable_cache() -> Path | None:
    """The cache folder, created if need be, or None where it cannot be written."""
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _build(compiler: str, folder: Path) -> Path:
    """The compiled library in ``folder``, from there when this source was built with this compiler before."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = b"\0".join(source.read_bytes() for source in SOURCES)
    key = hashlib.sha256(sources + "\0".join((compiler, version, *FLAGS)).encode()).hexdigest()[:16]
    library = folder / f"standins_f16-{key}.so"
    if library.exists():
        return library
    # Built under a temporary name and renamed: a concurrent process never loads a half-written file.
    handle, partial = tempfile.mkstemp(dir=folder, prefix=".building-", suffix=".so")
    os.close(handle)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", partial, *map(str, SOURCES)], capture_output=True,
                              text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


@functools.lru_cache(maxsize=None)
def standins_kernel() -> Callable[..., int] | None:
    """The kernel's entry point (``allocplan_add_dropped_f16``, arguments as in the C source; its ``rows``
    attribute the few-token form, its ``grouped`` attribute the grouped form, its ``alloc_t_few`` attribute
    Alloc-T's selection over a few tokens), or None where it cannot run here (module docstring). Built and
    loaded once per process."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or not all(map(Path.exists, SOURCES)) or not _cpu_supported():
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    cache = _writable_cache()
    folder = None
    try:
        # No writable cache: build in a private temporary folder, removed once the library is loaded (the
        # loaded copy stays mapped), so each such process builds once and leaves nothing behind.
        folder = cache or Path(tempfile.mkdtemp(prefix="allocplan-native-"))
        library = ctypes.CDLL(str(_build(compiler, folder)))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"the native stand-in kernel did not build ({error}); decoding uses the"
                      " torch forms instead", RuntimeWarning, stacklevel=2)
        return None
    finally:
        if cache is None and folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    function = library.allocplan_add_dropped_f16
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [i64, pointer, pointer, i64, pointer, pointer, pointer, pointer, pointer, i64, i64, i64]
    function.restype = i64
    # The same over T rows in one call (``allocplan_add_dropped_f16_rows``: T first, then the arguments above
    # with every row's slots, weights, inputs and outputs one after another), where one call per row would pay
    # the foreign call's own cost T times.
    rows = library.allocplan_add_dropped_f16_rows
    rows.argtypes = [i64, *function.argtypes]
    rows.restype = i64
    function.rows = rows
    # The same rows with their dropped pairs grouped by expert (``allocplan_add_dropped_f16_grouped``, arguments
    # as the rows form's), each factor row read once per block of pairs of one expert (prefill).
    grouped = library.allocplan_add_dropped_f16_grouped
    grouped.argtypes = rows.argtypes
    grouped.restype = i64
    function.grouped = grouped
    # Alloc-T's selection over a few tokens (``allocplan_alloc_t_few``: tokens, k, scores, weights, indices, real,
    # total pairs, k_base, sorted weights out, sorted indices out, keep out), decision for decision routing_rules'
    # Python form, and the routing rewrite that follows it (``allocplan_rewrite_few``).
    alloc_t_few = library.allocplan_alloc_t_few
    alloc_t_few.argtypes = [i64, i64, pointer, pointer, pointer, pointer, i64, i64, pointer, pointer, pointer]
    alloc_t_few.restype = i64
    function.alloc_t_few = alloc_t_few
    rewrite_few = library.allocplan_rewrite_few
    rewrite_few.argtypes = [i64, i64, pointer, pointer, pointer, pointer, ctypes.c_float, i64, i64, pointer, pointer]
    rewrite_few.restype = None
    function.rewrite_few = rewrite_few
    # A few tokens' float32 SwiGLU experts (``allocplan_experts_few``: tokens, k, indices, weights, experts, hidden,
    # inter, x, gate_up, down, out), pairs by expert ascending as the general form's grouping orders them.
    experts_few = library.allocplan_experts_few
    experts_few.argtypes = [i64, i64, pointer, pointer, i64, i64, i64, pointer, pointer, pointer, pointer]
    experts_few.restype = i64
    function.experts_few = experts_few
    return function
