"""One atomic, create-exclusive publisher for every write rolora-plugin makes.

Every file or folder the library or the CLI writes goes through this module, so the guarantees are the same
everywhere:

* **Atomic.** Content is written to a hidden staging path next to the target and renamed into place only when
  complete: readers see nothing or everything, never a half-written folder.
* **Create-exclusive.** Without ``overwrite`` the final rename refuses to replace anything that exists at that
  moment (``renameat2(RENAME_NOREPLACE)`` on Linux; elsewhere a check right before ``os.rename``, which still
  refuses a non-empty folder). A folder that appears at the target while we stage is never touched: we fail with
  :class:`OutputExistsError` and keep the user's content.
* **Overwrite without loss.** With ``overwrite=True`` the old target (folder or file) is first renamed aside to a
  hidden ``.NAME.old-*`` path, the new content is renamed in, and only then the old one is deleted. If the final
  rename fails the old content is moved back; if even that fails, the error names where it is.
* **Staging folders are marked** (a ``.rolora-staging`` file holding the owner's pid and host), so a later run
  for the same target can remove the ones a killed process left behind (:func:`clean_stale_staging`) without
  ever deleting anything this tool did not create.
* **Permissions follow the umask** (``mkdir``/``open``, not ``mkdtemp``'s private 0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "OutputExistsError",
    "atomic_output_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable_parent",
    "clean_stale_staging",
    "publish_path",
    "STAGING_MARKER",
]

logger = logging.getLogger(__name__)
STAGING_MARKER = ".rolora-staging"
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


class OutputExistsError(FileExistsError):
    """The output path exists (or appeared while writing) and ``overwrite`` was not asked for."""


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------- rename primitives


def _libc_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; raise :class:`FileExistsError` if ``dst`` exists (even as an empty folder)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: the filesystem lacks the flag: fall back
            raise OSError(err, os.strerror(err), str(dst)) if err != errno.EEXIST else FileExistsError(err, "exists", str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    try:
        os.rename(src, dst)  # replaces at most an empty folder created in the instant since the check
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def publish_path(staged: Path, target: Path, *, overwrite: bool = False) -> None:
    """Move the finished ``staged`` file or folder to ``target`` (see the module docstring for the guarantees)."""
    staged, target = Path(staged), Path(target)
    if not overwrite:
        try:
            rename_noreplace(staged, target)
        except FileExistsError:
            raise OutputExistsError(
                f"{target} appeared while the output was being written; nothing was changed there. "
                "Choose another output path, or remove it and run again."
            ) from None
        return
    old = None
    if os.path.lexists(target):
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    try:
        rename_noreplace(staged, target)
    except BaseException as e:
        if old is not None:
            try:
                rename_noreplace(old, target)
            except OSError:
                raise OSError(f"could not publish {target} ({e}); its previous content is kept at {old}") from e
        raise
    if old is not None:
        _remove(old)


# ---------------------------------------------------------------------------------------------- staging


def _staging_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _write_marker(folder: Path) -> None:
    (folder / STAGING_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove staging folders for ``target`` left by processes of this host that no longer run.

    Only folders named ``.<target name>.tmp-*`` that hold a :data:`STAGING_MARKER` written by this module are
    considered; one whose owner is alive or runs on another host is left alone. Returns what was removed.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    host = socket.gethostname()
    for cand in target.parent.glob(f".{target.name}.tmp-*"):
        marker = cand / STAGING_MARKER
        try:
            pid_text, owner = marker.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if owner == host and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(cand, ignore_errors=True)
            removed.append(cand)
    if removed:
        logger.info("removed %d stale staging folder(s) of %s left by an interrupted run", len(removed), target)
    return removed


def check_writable_parent(target: str | os.PathLike) -> Path:
    """Make sure ``target``'s parent folder exists (creating it) and accepts new entries, before long work starts.

    Raises :class:`OSError` with an actionable message (parent is a file, read-only, a pseudo filesystem, ...).
    """
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{target.name}.probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise OSError(f"cannot write {target}: {parent} does not accept new folders ({e.strerror or e}); choose another output path") from None
    return parent


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh, marked staging folder next to ``path``; publish it to ``path`` on success, delete on failure.

    Without ``overwrite``, ``path`` must not exist (an empty folder is accepted and replaced): otherwise
    :class:`OutputExistsError` before anything is staged, and also if something appears there while the block
    runs. The staging marker is removed before publishing.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path) and not _is_empty_dir(path):
        raise OutputExistsError(f"{path} already exists; choose a new output path, remove it, or pass overwrite=True")
    check_writable_parent(path)
    clean_stale_staging(path)
    tmp = _staging_path(path, "tmp")
    tmp.mkdir()
    try:
        _write_marker(tmp)
        yield tmp
        (tmp / STAGING_MARKER).unlink(missing_ok=True)
        if not overwrite and _is_empty_dir(path):
            with contextlib.suppress(OSError):
                path.rmdir()  # an empty folder holds nothing to lose; a non-empty one makes rmdir fail
        publish_path(tmp, path, overwrite=overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder (fsync'd, umask permissions).

    ``overwrite=True`` (default, for files the tool owns such as records) replaces an existing file atomically;
    ``overwrite=False`` refuses (:class:`OutputExistsError`) if ``path`` exists at the final rename.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            publish_path(Path(tmp), path, overwrite=False)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
