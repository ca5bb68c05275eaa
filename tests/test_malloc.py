"""Jobs re-execute themselves once with tcmalloc (or jemalloc) preloaded when one is installed."""

import os
import subprocess
import sys

import pytest

from valley_jax import malloc

# Prints its process id and LD_PRELOAD, then asks for the re-execution and prints what runs.
PROBE = ("import os; print(os.getpid(), os.environ.get('LD_PRELOAD', '-'), flush=True); "
         "from valley_jax import malloc; malloc.maybe_reexec(); print('on', malloc.active())")


def run_probe(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LD_PRELOAD", "VALLEY_MALLOC", "VALLEY_MALLOC_PRELOADED", "MALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line.split(" ", 1) for line in out.stdout.splitlines()]


@pytest.mark.skipif(malloc.find() is None,
                    reason="no tcmalloc / jemalloc installed (.ci/run installs libtcmalloc-minimal4)")
def test_reexecutes_once_with_the_allocator_preloaded():
    library = malloc.find()
    name = "jemalloc" if "jemalloc" in library else "tcmalloc"
    (pid, before), (same_pid, after), ran = run_probe()
    assert pid == same_pid and before == "-" and after == library
    assert ran == ["on", name]


def test_system_allocator_on_request():
    (_, preload), ran = run_probe(VALLEY_MALLOC="system")
    assert preload == "-" and ran == ["on", "None"]


@pytest.mark.skipif(malloc.find() is None,
                    reason="no tcmalloc / jemalloc installed (.ci/run installs libtcmalloc-minimal4)")
def test_no_second_reexecution_when_one_is_preloaded():
    library = malloc.find()
    (_, preload), ran = run_probe(LD_PRELOAD=library)
    assert preload == library and ran[0] == "on" and ran[1] in library


@pytest.mark.parametrize("argv,expected", [
    (["python", "-m", "valley_jax.train", "--config=c.py"], "valley_jax.train"),
    (["python", "-u", "-X", "importtime", "-W", "ignore", "-m", "valley_jax.chat", "-m", "x"],
     "valley_jax.chat"),
    (["python", "-mvalley_jax.evaluate"], "valley_jax.evaluate"),
    (["python", "-c", "import valley_jax", "-m", "valley_jax.train"], None),
    (["python", "script.py", "-m", "valley_jax.train"], None),
    (["python"], None),
])
def test_program_reads_the_module_run_with_dash_m(argv, expected):
    """The package re-executes only `python -m` runs of its programs, found in sys.orig_argv."""
    assert malloc.program(argv) == expected
