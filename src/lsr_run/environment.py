"""What environment a run ran in, measured against the lock the project installs from.

Seeded runs are deterministic only inside one exact set of package versions, so every run records the lock's
hash and the installed packages that differ from it (none, after ``make install``).
"""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path

LOCK_FILE = "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def find_lock() -> Path | None:
    """The checkout's lock file (an editable install), or None (a wheel installed elsewhere)."""
    candidate = Path(__file__).resolve().parents[2] / LOCK_FILE
    return candidate if candidate.is_file() else None


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = _PIN.match(line.strip())
        if m:
            pins[_normalise(m.group(1))] = m.group(2)
    return pins


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_record(path: Path | None = None) -> dict:
    """{file, sha256, pinned, differs: {package: {locked, installed}}}; {"file": None} without a lock."""
    path = path or find_lock()
    if path is None:
        return {"file": None}
    pins = read_pins(path)
    differs = {}
    for name, version in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            differs[name] = {"locked": version, "installed": installed}
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "pinned": len(pins),
            "differs": differs}
