"""Write files so that a reader never sees half of one.

Data goes to a temporary file in the target's directory, is flushed and fsynced, and
is then renamed over the target; a crash at any point leaves either the old file or
the complete new one.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Callable, Iterator

from ..errors import ProtonetError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it replaces `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = _create_temp(path, directory)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as e:
        _remove_quietly(tmp)
        raise ProtonetError(f"{path}: could not write ({e.strerror or e}); "
                            "the previous file, if any, is unchanged") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write(path: str, data: bytes | str) -> None:
    """Write bytes (or UTF-8 text) to `path` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)


def atomic_call(path: str, writer: Callable[[str], None]) -> None:
    """Let `writer(tmp_path)` produce the file, then move it into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _create_temp(path: str, directory: str) -> str:
    """A new empty file beside `path`, with the mode a plain open() would give it
    (0666 less the umask, applied by the kernel) or the mode of the file it replaces."""
    prefix = "." + os.path.basename(path) + "."
    for _ in range(100):
        tmp = os.path.join(directory, prefix + secrets.token_hex(6) + ".tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        except FileNotFoundError:
            pass
        return tmp
    raise ProtonetError(f"{path}: could not create a temporary file in {directory}")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
