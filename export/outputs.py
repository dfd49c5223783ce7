"""Output files: every path is checked before the work starts, then all outputs are written or none.

Each file is written to a temporary file next to its destination and renamed into place only once every
output is ready, so a failure never leaves a partial file or a mix of old and new outputs.  Temporary
files are created with mode 0666 and the process umask (``mkstemp`` would give 0600, unreadable by a
serving process under another user); a replaced file keeps its permission bits.
"""

from __future__ import annotations

import contextlib
import os
import secrets

from .errors import ExportError


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:  # hard links
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_inputs(outputs: dict, inputs: dict) -> None:
    """Raise ExportError (one line) when an output ``{label: path}`` names an input file ``{label: path
    or list of paths}`` (None = not given): writing it would destroy the input."""
    for label, path in outputs.items():
        for in_label, in_paths in inputs.items():
            for in_path in [in_paths] if isinstance(in_paths, (str, os.PathLike)) else in_paths or ():
                if path is not None and _same_file(os.fspath(path), os.fspath(in_path)):
                    raise ExportError(f"{label} {os.fspath(path)!r} is the input file of {in_label}; "
                                      "refusing to overwrite it")


def check_output_paths(paths: dict, inputs: dict | None = None) -> None:
    """Raise ExportError (one line) unless every ``{label: path}`` (None = not requested) names a file
    that can be written: not a directory or any other existing non-regular file (a device, FIFO or
    socket would be replaced by a regular file), none of the ``inputs`` (``{label: path}``, see
    ``refuse_inputs``), under a directory (existing or creatable) that we may write to, and no two
    labels naming the same file."""
    seen: dict[str, str] = {}
    for label, path in paths.items():
        if path is None:
            continue
        path = os.fspath(path)
        if not path or path.endswith(os.sep):
            raise ExportError(f"{label} {path!r} is not a file name")
        if os.path.isdir(path):
            raise ExportError(f"{label} {path!r} is a directory; give a file name")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise ExportError(f"{label} {path!r} exists and is not a regular file (a device, FIFO, socket "
                              "or broken link); give a regular file name")
        real = os.path.realpath(path)
        if real in seen:
            raise ExportError(f"{seen[real]} and {label} name the same file {path!r}")
        seen[real] = label
        refuse_inputs({label: path}, inputs or {})
        anchor = _nearest_existing(os.path.dirname(os.path.abspath(path)))
        if not os.path.isdir(anchor):
            raise ExportError(f"{label} {path!r}: {anchor!r} is not a directory")
        try:  # a real probe: os.access is wrong for root, read-only mounts and ACLs
            fd, probe = _create_temp(anchor, ".tritonbn-probe")
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            raise ExportError(f"{label} {path!r} is not writable: cannot create files in {anchor!r} "
                              f"({e.strerror})") from None


def _create_temp(directory: str, base: str, mode: int = 0o666) -> tuple[int, str]:
    for _ in range(100):
        tmp = os.path.join(directory, f"{base}.{secrets.token_hex(4)}.tmp")
        try:  # O_EXCL: never follow or reuse an existing name; the umask applies to ``mode``
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot find a free temporary name in {directory!r}")


class StagedWrites:
    """``with StagedWrites() as w: w.add(path, data); ...; w.commit()``: nothing reaches a destination
    until ``commit``; leaving the block without it removes every temporary file (and any directory
    created for one)."""

    def __init__(self):
        self._staged: list[tuple[str, str]] = []  # (tmp, path)
        self._made_dirs: list[str] = []

    def __enter__(self) -> StagedWrites:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def _makedirs(self, directory: str) -> None:
        missing = []
        while not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for d in reversed(missing):
            os.mkdir(d)
            self._made_dirs.append(d)

    def add(self, path, data: bytes, check=None) -> str:
        """Write ``data`` to a temporary file for ``path`` and return its name; ``check(tmp)`` may raise
        to abort (e.g. verification of the written file)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        try:
            self._makedirs(directory)
            fd, tmp = _create_temp(directory, "." + os.path.basename(path))
        except OSError as e:
            raise ExportError(f"cannot write {path!r}: {e.strerror or e}") from e
        self._staged.append((tmp, path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if os.path.isfile(path):
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except OSError as e:
            raise ExportError(f"cannot write {path!r}: {e.strerror or e}") from e
        if check is not None:
            check(tmp)
        return tmp

    def commit(self) -> None:
        """Rename every staged file into place (same directory: atomic per file)."""
        try:
            while self._staged:
                tmp, path = self._staged[0]
                os.replace(tmp, path)
                self._staged.pop(0)
        except OSError as e:
            raise ExportError(f"cannot write {path!r}: {e.strerror or e}") from e
        self._made_dirs.clear()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        self._staged.clear()
        for d in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self._made_dirs.clear()


def write_atomic(path, data: bytes, check=None) -> None:
    """Write one file atomically (see StagedWrites); an existing ``path`` is untouched on failure."""
    with StagedWrites() as w:
        w.add(path, data, check)
        w.commit()
