"""One atomic, create-exclusive publisher for every write rolora-plugin makes.

Every file or folder the library or the CLI writes goes through this module, so the guarantees are the same
everywhere:

* **Atomic.** Content is written to a hidden staging path next to the target and renamed into place only when
  complete: readers see nothing or everything, never a half-written folder.
* **Create-exclusive.** Without ``overwrite`` the final rename refuses to replace anything that exists at that
  moment (``renameat2(RENAME_NOREPLACE)`` on Linux; elsewhere a check right before ``os.rename``, which still
  refuses a non-empty folder). A folder that appears at the target while we stage is never touched: we fail with
  :class:`OutputExistsError` and keep the user's content. Of two concurrent publishers to one target, one wins.
* **Overwrite without loss.** With ``overwrite=True`` the old target (folder or file) is first renamed aside to a
  hidden ``.NAME.old-*`` path, the new content is renamed in, and only then the old one is deleted. If the final
  rename fails the old content is moved back; if even that fails, the error names where it is.
* **Every publish is journaled, so a kill at any instant is recoverable.** Before the first rename,
  :func:`publish_path` writes (atomically, fsync'd) a small journal ``.NAME.publish-*.json`` next to the target:
  the target's name, the staged (new) path, the aside (old) path, the identity (device, inode) of each, the mode,
  and the owner's pid and host. It is removed last, once the old content is gone. A later run for the same target
  (:func:`recover_interrupted`, called by :func:`clean_stale_staging`, :func:`atomic_output_dir` and
  :func:`publish_path`) finishes what a killed owner left, logging a warning that says what it did:

  - **The rule: once the journal exists the new content is complete, so recovery completes the publish** (moves
    the new content in, then deletes the old): killed before the first rename, between the renames, after them,
    or while deleting the old content, the target ends up holding the new content and nothing is left beside it.
  - If the new content is gone (removed by hand), the old content is moved back to the target instead.
  - If the target holds something that is neither (the user or another run put it there), nothing is touched:
    an overwrite's old and new content are left where they are, named in a warning on every later run until the
    user moves them; a create-exclusive publish's staged copy is dropped (it lost the race).
  - Recovery only acts on journals whose owner ran on this host and no longer runs, only on paths whose identity
    matches the journal, and only on hidden ``.NAME.*`` paths beside the target; two recoverers are serialised
    by a lock on the journal. A hidden ``.NAME.old-*`` that no journal names (left by an older version) is
    reported, never removed.
* **Staging folders are marked** (a ``.rolora-staging`` file holding the owner's pid and host), so a later run
  for the same target can remove the ones a killed process left behind (:func:`clean_stale_staging`) without
  ever deleting anything this tool did not create. The marker is removed only after the journal is written, so a
  staging folder is named by its marker or by a journal at every instant. The other short-lived paths carry
  their owner's pid in their name (``check_writable_parent``'s empty probe folder, :func:`atomic_write_bytes`'s
  temporary file, a journal being written) and are removed by the next run once that process is gone.
* **Direct callers of** :func:`publish_path` stage beside the target under a hidden ``.NAME.*`` name: recovery
  only ever moves or deletes such paths.
* **Permissions follow the umask** (``mkdir``/``open``, not ``mkdtemp``'s private 0700).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: recoverers are not serialised (recovery is idempotent but may race)
    fcntl = None

__all__ = [
    "OutputExistsError",
    "atomic_output_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable_parent",
    "clean_stale_staging",
    "publish_path",
    "recover_interrupted",
    "STAGING_MARKER",
]

logger = logging.getLogger(__name__)
_REPORTED: set[str] = set()  # what was left for the user to sort out, already named by this process (once each)
STAGING_MARKER = ".rolora-staging"
JOURNAL_KIND = "publish"  # journals are ``.<target name>.publish-<id>.json`` beside the target
_JOURNAL_VERSION = 1
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


def _ident(path: Path | None) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself (a link is not followed), None if absent. A rename keeps it."""
    if path is None:
        return None
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino)


def _fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (best effort: some filesystems refuse to fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_path(staged: Path, target: Path, *, overwrite: bool = False) -> None:
    """Move the finished ``staged`` file or folder to ``target`` (see the module docstring for the guarantees).

    Steps, each recoverable if the process is killed right before or after it: (1) finish any interrupted
    publish to ``target``, (2) write the journal, (3) remove the staging marker, (4) ``overwrite`` only: rename
    the old target aside, (5) rename ``staged`` to ``target`` (create-exclusive), (6) delete the old content,
    (7) remove the journal.
    """
    staged, target = Path(staged), Path(target)
    recover_interrupted(target)
    old = _staging_path(target, "old") if overwrite and os.path.lexists(target) else None
    new_id, old_id = _ident(staged), _ident(target) if old is not None else None
    journal = _write_journal(target, staged, old, new_id, old_id, overwrite)
    had_marker = False
    try:
        had_marker = _strip_marker(staged)
        if old is not None:
            try:
                os.rename(target, old)
            except FileNotFoundError:  # removed meanwhile (by another overwriting run): nothing old to keep
                old = None
        rename_noreplace(staged, target)
    except BaseException as e:
        _undo(e, staged, target, old, new_id, old_id, had_marker, journal)
        if isinstance(e, FileExistsError):
            raise OutputExistsError(
                f"{target} appeared while the output was being written; nothing was changed there. "
                "Choose another output path, or remove it and run again."
            ) from None
        raise
    _finish(target, old, journal)


def _undo(error: BaseException, staged: Path, target: Path, old: Path | None, new_id, old_id, had_marker: bool,
          journal: Path) -> None:  # fmt: skip
    """After a failure or an interruption inside :func:`publish_path`: keep whichever state is whole.

    Published already (the interruption came after the final rename): finish. Old content aside and the target
    free: move it back. If that fails the journal stays (so later runs report where the old content is)."""
    here = _ident(target)
    if here is not None and here == new_id:
        _finish(target, old, journal)
        return
    if old is not None and _ident(old) == old_id:  # the old content is aside: put it back if the target is free
        try:
            if here is not None:
                raise FileExistsError(errno.EEXIST, "something else appeared there meanwhile (left untouched)")
            rename_noreplace(old, target)
        except OSError as e:  # the journal stays: every later run for this target names the old content
            raise OSError(f"could not publish {target} ({error}) nor put its previous content back ({e.strerror or e}); "
                          f"the previous content is kept at {old}") from error  # fmt: skip
    if had_marker and _ident(staged) == new_id:
        with contextlib.suppress(OSError):
            _write_marker(staged)  # the caller deletes it; if it is killed first, the marker says whose it is
    journal.unlink(missing_ok=True)


def _finish(target: Path, old: Path | None, journal: Path) -> None:
    """The new content is in place: delete the old content, then the journal (kept if the old one stays)."""
    if old is not None:
        _remove(old)
        if os.path.lexists(old):
            logger.warning("published %s, but could not delete its previous content at %s; remove it by hand", target, old)
            return
    journal.unlink(missing_ok=True)
    _fsync_dir(target.parent)


# ---------------------------------------------------------------------------------------------- journal


_ID = "[0-9a-f]" * 8  # the uuid part of staging, aside and journal names


def _journals(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.{JOURNAL_KIND}-{_ID}.json"))


def _write_journal(target: Path, staged: Path, old: Path | None, new_id, old_id, overwrite: bool) -> Path:
    """Write the journal of one publish atomically (a ``.part`` file, fsync'd, renamed) and fsync the folder."""
    parent = target.parent
    entry = {"version": _JOURNAL_VERSION, "target": target.name, "new": os.path.relpath(staged, parent),
             "old": old.name if old is not None else None, "new_id": new_id, "old_id": old_id,
             "overwrite": overwrite, "pid": os.getpid(), "host": socket.gethostname()}  # fmt: skip
    jid = uuid.uuid4().hex[:8]
    journal = parent / f".{target.name}.{JOURNAL_KIND}-{jid}.json"
    part = parent / f".{target.name}.{JOURNAL_KIND}-{jid}.{os.getpid()}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask())
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(part, journal)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _fsync_dir(parent)
    return journal


def _read_journal(journal: Path, target: Path) -> dict | None:
    """The journal's entry; None if it is not a readable journal of ``target``."""
    try:
        entry = json.loads(journal.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(entry, dict) and entry.get("version") == _JOURNAL_VERSION and entry.get("target") == target.name
          and type(entry.get("pid")) is int and entry["pid"] > 0 and isinstance(entry.get("host"), str))  # fmt: skip
    return entry if ok else None


def _journal_path(parent: Path, target: Path, name) -> Path | None:
    """A path named in a journal, accepted only as a hidden ``.<target>.*`` entry directly in ``parent``."""
    if not isinstance(name, str) or os.sep in name or (os.altsep and os.altsep in name):
        return None
    return parent / name if name.startswith(f".{target.name}.") else None


@contextlib.contextmanager
def _claimed(journal: Path):
    """Yield True if this process holds the journal's lock (another recoverer holding it: False)."""
    try:
        f = open(journal, "rb")
    except OSError:
        yield False
        return
    with f:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(journal).st_ino  # not removed while we waited
        except OSError:
            same = False
        yield same


def _owner_dead(entry: dict) -> bool:
    return entry["host"] == socket.gethostname() and entry["pid"] != os.getpid() and not _pid_alive(entry["pid"])


def recover_interrupted(target: str | os.PathLike) -> list[str]:
    """Finish or roll back publishes to ``target`` whose process was killed (the rule is in the module doc).

    Journals of live processes, of other hosts, or that cannot be read are left alone. Returns one sentence per
    action taken (each also logged as a warning)."""
    target = Path(target)
    done: list[str] = []
    if not target.parent.is_dir():
        return done
    for journal in _journals(target):
        entry = _read_journal(journal, target)
        if entry is None:
            if os.path.lexists(journal) and str(journal) not in _REPORTED:
                _REPORTED.add(str(journal))
                logger.warning("cannot read %s as a publish journal of %s; left it untouched", journal, target)
            continue
        if not _owner_dead(entry):
            continue
        with _claimed(journal) as mine:
            if not mine:
                continue
            try:
                what = _recover_one(journal, target, entry)
            except OSError as e:
                what = f"{target}: could not finish a publish interrupted in pid {entry['pid']} ({e}); left as it is, see {journal}"
            if what:
                done.append(what)
                if what not in _REPORTED:  # content left for the user is named once per process, actions always
                    logger.warning("%s", what)
                if os.path.lexists(journal):
                    _REPORTED.add(what)
    for part in target.parent.glob(f".{glob.escape(target.name)}.{JOURNAL_KIND}-{_ID}.*.part"):
        pid = part.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            part.unlink(missing_ok=True)  # a journal cut short while written: no rename had happened yet
    done += _report_unjournaled_old(target)
    return done


def _recover_one(journal: Path, target: Path, entry: dict) -> str | None:
    parent = target.parent
    new, old = _journal_path(parent, target, entry.get("new")), _journal_path(parent, target, entry.get("old"))
    new_id = tuple(entry["new_id"]) if entry.get("new_id") else None
    old_id = tuple(entry["old_id"]) if entry.get("old_id") else None
    have_new = new is not None and new_id is not None and _ident(new) == new_id
    have_old = old is not None and old_id is not None and _ident(old) == old_id
    here = _ident(target)
    what = f"{target}: a publish (pid {entry['pid']}) was interrupted"
    if here is not None and here == new_id:  # published; killed before or while deleting the old content
        if have_old:
            _remove(old)
            if os.path.lexists(old):
                return f"{what} after the new content was in place; its previous content at {old} could not be deleted: remove it by hand"
            what = f"{what} after the new content was in place; deleted its previous content ({old.name})"
        else:
            what = None  # only the journal was left: nothing the user needs to know
    elif have_new and (here is None or (entry.get("overwrite") and here == old_id and old is not None)):
        if here is not None:  # killed before the old content was moved aside: complete the overwrite
            rename_noreplace(target, old)
            have_old = True
        _strip_marker(new)
        rename_noreplace(new, target)
        if have_old:
            _remove(old)
        what = f"{what}; completed it: {target} now holds the new content" + (" (previous content deleted)" if have_old else "")
    elif have_old and here is None:  # the new content is gone: put the old content back
        rename_noreplace(old, target)
        what = f"{what} and its new content is missing; restored the previous content of {target}"
    elif here is not None and here != new_id and (have_new or have_old):  # someone else's content is at the target
        if not entry.get("overwrite") and have_new:
            _remove(new)
            what = f"{what}, and {target} now holds other content; dropped the unpublished copy {new.name}"
        else:
            kept = ", ".join(f"{label} content at {p}" for label, p, ok in (("previous", old, have_old), ("new", new, have_new)) if ok)
            return (f"{what}, and {target} now holds other content, left untouched; the interrupted run's {kept} "
                    "is kept: move what you need elsewhere and delete the rest")  # fmt: skip
    else:
        what = None  # nothing of that publish is left (the target already held it, or it was moved by hand)
    journal.unlink(missing_ok=True)
    _fsync_dir(parent)
    return what




def _report_unjournaled_old(target: Path) -> list[str]:
    """Hidden ``.<target>.old-*`` paths no journal names (an older version was killed mid-overwrite, or the user
    removed a journal): reported once per process, never removed or moved."""
    olds = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-{_ID}"))
    if not olds:
        return []
    named = {(_read_journal(j, target) or {}).get("old") for j in _journals(target)}  # read after the glob
    found = []
    for path in olds:
        if path.name in named or str(path) in _REPORTED or not os.path.lexists(path):
            continue
        _REPORTED.add(str(path))
        state = "is missing" if not os.path.lexists(target) else "exists"
        found.append(f"{path} may hold the previous content of {target} (which {state}), left by an overwrite that "
                     "was interrupted without a journal; move it back or delete it")  # fmt: skip
        logger.warning("%s", found[-1])
    return found


# ---------------------------------------------------------------------------------------------- staging


def _staging_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}"


def _write_marker(folder: Path) -> None:
    (folder / STAGING_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")


def _strip_marker(staged: Path) -> bool:
    """Remove the staging marker from a staged folder (it must not be published); True if there was one."""
    marker = staged / STAGING_MARKER
    if staged.is_dir() and not staged.is_symlink() and marker.is_file():
        marker.unlink()
        return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Recover interrupted publishes to ``target`` (:func:`recover_interrupted`), then remove staging folders for
    ``target`` left by processes of this host that no longer run.

    Only folders named ``.<target name>.tmp-*`` that hold a :data:`STAGING_MARKER` written by this module and that
    no remaining journal names are considered; one whose owner is alive or runs on another host is left alone.
    Returns the staging folders removed.
    """
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    recover_interrupted(target)
    named = {(_read_journal(j, target) or {}).get("new") for j in _journals(target)}
    host = socket.gethostname()
    for cand in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):  # marked and unnamed: checked below
        marker = cand / STAGING_MARKER
        try:
            pid_text, owner = marker.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if cand.name not in named and owner == host and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(cand, ignore_errors=True)
            removed.append(cand)
    _remove_dead_parts(target)
    for probe in target.parent.glob(f".{glob.escape(target.name)}.probe-*-{_ID}"):  # check_writable_parent's
        pid = probe.name.rsplit("-", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                probe.rmdir()  # an empty folder only
    if removed:
        logger.info("removed %d stale staging folder(s) of %s left by an interrupted run", len(removed), target)
    return removed


def _remove_dead_parts(target: Path) -> None:
    """Delete the temporary files of :func:`atomic_write_bytes` for ``target`` whose writer was killed."""
    if not target.parent.is_dir():
        return
    for part in target.parent.glob(f".{glob.escape(target.name)}.part-*-*.tmp"):
        pid = part.name[len(target.name) + 7 :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and not part.is_dir():
            part.unlink(missing_ok=True)


def check_writable_parent(target: str | os.PathLike) -> Path:
    """Make sure ``target``'s parent folder exists (creating it) and accepts new entries, before long work starts.

    Raises :class:`OSError` with an actionable message (parent is a file, read-only, a pseudo filesystem, ...).
    """
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{target.name}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # a killed owner's: removed later
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
    runs. The staging marker is removed by :func:`publish_path` once its journal is written.
    """
    path = Path(path)
    clean_stale_staging(path)  # first: finishing a killed publish may create ``path``
    if not overwrite and os.path.lexists(path) and not _is_empty_dir(path):
        raise OutputExistsError(f"{path} already exists; choose a new output path, remove it, or pass overwrite=True")
    check_writable_parent(path)
    tmp = _staging_path(path, "tmp")
    tmp.mkdir()
    try:
        _write_marker(tmp)
        yield tmp
        if not overwrite and _is_empty_dir(path):
            with contextlib.suppress(OSError):
                path.rmdir()  # an empty folder holds nothing to lose; a non-empty one makes rmdir fail
        publish_path(tmp, path, overwrite=overwrite)  # removes the staging marker once its journal is written
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
    _remove_dead_parts(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.part-{os.getpid()}-", suffix=".tmp")
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
