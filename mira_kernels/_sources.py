"""The digest of the sources the native extension ``mira_kernels._C`` is built from.

``setup.py`` writes it beside the built library (``_C.sources``); in a source checkout,
:mod:`mira_kernels._extension` compares it with the checkout's sources at import, so that a
library built from other sources (a ``git pull`` without ``make build``) is named, not silently
run. Pure Python with no imports of the package: ``setup.py`` loads this file by path.
"""

from __future__ import annotations

import hashlib
import os

#: What the extension is built from, relative to the repository root: every native source, and
#: the two Python files the build runs.
SUFFIXES = (".cpp", ".cu", ".h", ".cuh", ".inc")
BUILD_FILES = ("setup.py", os.path.join("mira_kernels", "_config.py"))
RECORD_NAME = "_C.sources"


def source_files(root: str) -> list[str]:
    """The files the digest covers, relative to ``root``, sorted (empty without ``root/csrc``)."""
    csrc = os.path.join(root, "csrc")
    if not os.path.isdir(csrc):
        return []
    found = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(csrc) for f in files
             if f.endswith(SUFFIXES)]
    return sorted(found) + [f for f in BUILD_FILES if os.path.exists(os.path.join(root, f))]


def source_digest(root: str) -> str | None:
    """SHA-256 (first 16 hex digits) over the files' paths and bytes; None outside a source checkout."""
    files = source_files(root)
    if not files:
        return None
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def stale_note(root: str, library_dir: str) -> str | None:
    """Why the library in ``library_dir`` does not match the sources under ``root`` (None when it
    does, or when either side has no record: an installed wheel, or a library built before records)."""
    try:
        with open(os.path.join(library_dir, RECORD_NAME)) as f:
            built = f.read().strip()
    except OSError:
        return None
    now = source_digest(root)
    if now is None or now == built:
        return None
    return (f"mira_kernels._C was built from other sources than this checkout's (built from {built}, the "
            f"sources now {now}): the native kernels may not be the code you read; rebuild with `make build`")


if __name__ == "__main__":  # the Makefile's list of what the build reads (one list, here)
    print(" ".join(source_files(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
