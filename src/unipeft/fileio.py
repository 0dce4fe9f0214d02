"""Atomic file writes: a reader (or a crash) never sees half a file.

``atomic_write(path, write)`` calls ``write(tmp)`` on a temporary file in the same folder,
then renames it over ``path``; on any error the temporary file is removed and ``path`` is
untouched. Directories (saved deltas, checkpoints) have their own rename-into-place in
``storage.py`` and ``training/checkpoint.py``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, obj, **kw) -> Path:
    return write_text(path, json.dumps(obj, **kw))
