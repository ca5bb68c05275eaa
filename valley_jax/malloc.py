"""Run jobs on tcmalloc (or jemalloc) instead of glibc's malloc when one is installed.

XLA:CPU allocates and frees its buffers on every step; under glibc's malloc a demo train step
takes about a third longer than under tcmalloc (BENCHMARKS.md, "Train step": 0.28 against 0.21 s),
much of it in page faults on freshly mapped memory. An allocator has to be in place before the
process starts (`LD_PRELOAD`), so `maybe_reexec` runs the same command again, once, with it
preloaded. The package's `__init__` does that for `python -m valley_jax.train`, `.chat` and
`.evaluate` (PROGRAMS), before the program imports jax and the rest; importing valley_jax in any
other process changes nothing. Nothing changes numerically. Debian / Ubuntu:
`apt-get install libtcmalloc-minimal4` (or `libjemalloc2`); `VALLEY_MALLOC=system` keeps glibc's
allocator.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

# In order of preference; jemalloc is told to keep freed pages (its default returns them after
# 10 s of disuse and measured no faster than glibc's here).
LIBRARIES = ("tcmalloc_minimal", "tcmalloc", "jemalloc")
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_MARK = "VALLEY_MALLOC_PRELOADED"  # set in the re-executed process: never loop
PROGRAMS = ("valley_jax.train", "valley_jax.chat", "valley_jax.evaluate")
# Interpreter options that take the next argument as their value.
_OPTIONS_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")


def program(argv: list[str] | None = None) -> str | None:
    """The module this interpreter was started to run with `-m` (from `sys.orig_argv`), or None
    (a script, `-c`, an interactive session)."""
    args = list(sys.orig_argv if argv is None else argv)[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m":
            return args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("-m"):
            return arg[2:]
        if arg == "-c" or not arg.startswith("-"):
            return None
        i += 2 if arg in _OPTIONS_WITH_VALUE else 1
    return None


def find() -> str | None:
    """The first installed allocator library of LIBRARIES (its soname), or None."""
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def active() -> str | None:
    """The allocator preloaded into this process (tcmalloc, jemalloc or mimalloc), or None."""
    preload = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ("tcmalloc", "jemalloc", "mimalloc") if name in preload), None)


def maybe_reexec() -> None:
    """Replaces this process by the same command with a faster allocator preloaded, when one is
    installed and none is in use yet; otherwise returns. Call it before any thread or backend
    starts; the process id stays the same."""
    if (sys.platform != "linux" or not sys.executable
            or os.environ.get("VALLEY_MALLOC", "auto") == "system"
            or os.environ.get(_MARK) or active()):
        return
    library = find()
    if library is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    env = dict(os.environ, LD_PRELOAD=f"{library} {preload}".strip(), **{_MARK: library})
    if "jemalloc" in library:
        env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def describe() -> str:
    """One line for the log: which allocator runs, or how to get a faster one."""
    name = active()
    if name:
        return f"memory allocator: {name} (LD_PRELOAD={os.environ['LD_PRELOAD']})"
    if os.environ.get("VALLEY_MALLOC") == "system":
        return "memory allocator: the system's (VALLEY_MALLOC=system)"
    return ("memory allocator: the system's; CPU steps run about 25% faster with tcmalloc "
            "(apt-get install libtcmalloc-minimal4), which valley_jax then uses by itself")
