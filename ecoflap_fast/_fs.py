"""Output folders that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_destination(out: Path, force: bool) -> None:
    """Refuse an existing destination without ``force``, or a path that runs through a file."""
    if out.exists() and not force:
        raise FileExistsError(f"output folder {str(out)!r} exists; pass --force to replace it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{str(parent)!r} is a file, so {str(out)!r} cannot be created")
            break


@contextmanager
def staged_folder(out: Path, force: bool):
    """Yield a temporary folder beside ``out``. If the block succeeds it is renamed to ``out`` (an
    existing ``out`` is moved aside first and removed after); if it fails or the process dies, ``out``
    is untouched and the temporary folder is removed (or left as a dot-folder after a kill)."""
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)  # only after every check has passed
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
