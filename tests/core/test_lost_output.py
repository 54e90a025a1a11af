"""Issue 31, kind 1: output the user had is never lost, and a killed publish is always recoverable.

Table-driven, per kind of defect:

* **Kill at every step of publishing.** A forked child runs a real publish (overwrite of a folder, of a file, of
  nothing; create-exclusive folder and file) and is killed (``os._exit``, no clean-up runs) right before its k-th
  filesystem mutation, for every k until it completes. After each kill the old or the new content is still whole
  somewhere; the next run (``clean_stale_staging``, an overwrite, a create-exclusive publish) restores or
  completes it, says so in a warning, and leaves nothing beside the target. Recovery itself is killed at every
  step too, and finished by the run after it.
* **Races:** two recoverers of one killed publish; a recoverer beside a live publisher; two concurrent
  overwriters.
* **rolora train's clean-up:** a table of (output_dir, checkpoint_dir) relations: overlapping ones are refused
  up front (exit 2, one line, nothing written); the others publish, and the clean-up removes only what the run
  wrote (foreign content survives and is named). The clean-up is killed at every step, and the defensive layer
  is checked on its own.

Before the fix: the overwrite killed between its renames left the target missing, the new content unmarked and
nothing that a later run would restore; ``checkpoint_dir`` a parent of ``output_dir`` deleted the published run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import rolora_plugin.io.publish as publish
from rolora_plugin.io.publish import (
    STAGING_MARKER,
    OutputExistsError,
    atomic_output_dir,
    clean_stale_staging,
    recover_interrupted,
)

KILLED, DONE, FAILED = 77, 0, 3
MUTATIONS = ("rename", "replace", "unlink", "remove", "rmdir", "mkdir", "fsync")

OLD_DIR = {"weights.bin": "old weights", "sub/notes.txt": "old notes"}
NEW_DIR = {"weights.bin": "new weights", "sub/extra.txt": "new extra", "config.json": "{}"}
THIRD_DIR = {"third.txt": "third"}


# ---------------------------------------------------------------------------------------------- helpers


def snapshot(path: Path):
    """A folder as {relative path: text}, a file as its text, None if absent."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return path.read_bytes().decode("latin-1")  # lossless for any bytes
    return {str(p.relative_to(path)): p.read_bytes().decode("latin-1") for p in sorted(path.rglob("*")) if p.is_file()}


def write_tree(folder: Path, files: dict) -> None:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _kill_at(k: int) -> None:
    """In a forked child: exit at once, before the k-th filesystem mutation (a SIGKILL at that instant)."""
    count = [0]

    def wrap(fn):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os._exit(KILLED)
            return fn(*args, **kwargs)

        return step

    for name in MUTATIONS:
        setattr(os, name, wrap(getattr(os, name)))
    if publish._renameat2 is not None:
        publish._renameat2 = wrap(publish._renameat2)


def in_child(action, kill_at: int | None = None) -> int:
    """Run ``action()`` in a forked child, killed before its ``kill_at``-th mutation; the child's exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = FAILED
        try:
            logging.disable(logging.CRITICAL)
            if kill_at is not None:
                _kill_at(kill_at)
            action()
            code = DONE
        except BaseException:  # noqa: BLE001 - reported by the exit code
            code = FAILED
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def journals(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.publish-*.json"))


# ---------------------------------------------------------------------------------------------- scenarios

# Forking this test process (torch loaded) costs ~30 ms a kill; a small server process that loads only
# rolora_plugin/io/publish.py (the same file, standard library imports only) forks the killed children in ~1 ms.
_SERVER = textwrap.dedent(
    """
    import importlib.util, json, logging, os, sys, traceback
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("publish_under_test", sys.argv[1])
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    NEW_DIR, MUTATIONS, KILLED = json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])

    def write_tree(folder, files):
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)

    def folder_publish(target, overwrite):
        with publish.atomic_output_dir(target, overwrite=overwrite) as tmp:
            write_tree(tmp, NEW_DIR)

    ACTIONS = {
        "folder, overwrite": lambda t: folder_publish(t, True),
        "folder, create-exclusive": lambda t: folder_publish(t, False),
        "file, create-exclusive": lambda t: publish.atomic_write_bytes(t, b"new file", overwrite=False),
        "staged file, overwrite": lambda t: publish.publish_path(t.parent / f".{t.name}.staged", t, overwrite=True),
        "recover": lambda t: publish.clean_stale_staging(t),
    }

    def kill_at(k):
        count = [0]

        def wrap(fn):
            def step(*args, **kwargs):
                count[0] += 1
                if count[0] == k:
                    os._exit(KILLED)
                return fn(*args, **kwargs)
            return step

        for name in MUTATIONS:
            setattr(os, name, wrap(getattr(os, name)))
        if publish._renameat2 is not None:
            publish._renameat2 = wrap(publish._renameat2)

    for line in sys.stdin:
        action, target, k = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                logging.disable(logging.CRITICAL)
                if k:
                    kill_at(k)
                ACTIONS[action](Path(target))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    """
)


class KillServer:
    def __init__(self):
        args = [publish.__file__, json.dumps(NEW_DIR), json.dumps(MUTATIONS), str(KILLED)]
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip

    def run(self, action: str, target: Path, kill_at: int | None = None) -> int:
        """Run ``action`` on ``target`` in a fresh child killed before its ``kill_at``-th mutation; its exit code."""
        self.proc.stdin.write(json.dumps([action, str(target), kill_at]) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    srv = KillServer()
    yield srv
    srv.close()


# name -> (the target before (folder dict / file text / None), the new content, the server's action)
SCENARIOS = {
    "overwrite folder": (OLD_DIR, NEW_DIR, "folder, overwrite"),
    "overwrite file by folder": ("old file", NEW_DIR, "folder, overwrite"),
    "overwrite nothing": (None, NEW_DIR, "folder, overwrite"),
    "create-exclusive folder": (None, NEW_DIR, "folder, create-exclusive"),
    "create-exclusive file": (None, "new file", "file, create-exclusive"),
    "publish_path file over file": ("old file", "new file", "staged file, overwrite"),
}
CALLER_OWNED = {"publish_path file over file": [".out.staged"]}  # staged by the caller before publish_path


def _setup(tmp_path: Path, before) -> Path:
    target = tmp_path / "out"
    if isinstance(before, dict):
        target.mkdir()
        write_tree(target, before)
    elif isinstance(before, str):
        target.write_text(before)
    (tmp_path / "neighbour.txt").write_text("not ours")  # must survive everything
    return target


def _prepare(case: Path, name: str) -> Path:
    before, new, action = SCENARIOS[name]
    case.mkdir(parents=True)
    target = _setup(case, before)
    if name in CALLER_OWNED:
        (case / CALLER_OWNED[name][0]).write_text(new)
    return target


def _kill_points(server, tmp_path: Path, name: str):
    """Yield (k, target) for every k until the publish completes without being killed."""
    action = SCENARIOS[name][2]
    for k in range(1, 200):
        target = _prepare(tmp_path / f"k{k}", name)
        code = server.run(action, target, kill_at=k)
        if code == DONE:
            return
        assert code == KILLED, f"the publish failed instead of being killed at step {k}"
        yield k, target
    raise AssertionError("the publish never completed")


def _whole(state, before, new) -> bool:
    return state == before or state == new


def _assert_recoverable_now(target: Path, before, new) -> None:
    """Right after the kill: the old or the new content is whole at the target, or beside it under a journal."""
    if _whole(snapshot(target), before, new):
        return
    assert journals(target), f"{target} is {snapshot(target)!r} and no journal says where its content went"
    beside = [snapshot(target.parent / n) for n in leftovers(target)]
    assert before in beside or new in beside, beside


ROUTES = [(name, "clean_stale_staging") for name in SCENARIOS] + [
    (name, route) for name in ("overwrite folder", "create-exclusive folder") for route in ("next overwrite", "next create-exclusive")
]


@pytest.mark.parametrize(("name", "recovery"), ROUTES)
def test_a_publish_killed_at_any_step_is_recovered_by_the_next_run(name, recovery, server, tmp_path, caplog):
    before, new, _ = SCENARIOS[name]
    steps = 0
    for k, target in _kill_points(server, tmp_path, name):
        steps += 1
        _assert_recoverable_now(target, before, new)
        journaled, now = bool(journals(target)), snapshot(target)
        needs_work = journaled and (snapshot(target) != new or any(n for n in leftovers(target) if ".publish-" not in n))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rolora_plugin.io.publish"):
            if recovery == "clean_stale_staging":
                clean_stale_staging(target)
            elif recovery == "next overwrite":
                with atomic_output_dir(target, overwrite=True) as tmp:
                    write_tree(tmp, THIRD_DIR)
            else:
                try:
                    with atomic_output_dir(target) as tmp:
                        write_tree(tmp, THIRD_DIR)
                    published_third = True
                except OutputExistsError:
                    published_third = False
        warned = [r.getMessage() for r in caplog.records if str(target) in r.getMessage()]
        after = snapshot(target)
        # the rule: once the journal exists, the publish is completed; before it, the old content stays
        expected = new if journaled or now == new else before
        if recovery == "next overwrite":
            assert after == THIRD_DIR, (k, after)
        elif recovery == "next create-exclusive":
            assert (after == THIRD_DIR) if published_third else (after == expected), (k, after)
            assert published_third == (expected is None), (k, expected)  # refused up front when content exists
        else:
            assert after == expected, (k, after)
        # the caller's own staged file (publish_path called directly) stays the caller's until the journal names it
        assert leftovers(target) == ([] if journaled or now == new else CALLER_OWNED.get(name, [])), (k, leftovers(target))
        assert (target.parent / "neighbour.txt").read_text() == "not ours"
        if needs_work:
            assert warned, f"kill at step {k}: recovery changed {target} without saying so"
        assert clean_stale_staging(target) == [] and snapshot(target) == after  # idempotent
    assert steps >= (5 if before is not None else 3), steps  # the table really covered the steps


def _state(target: Path, before, new) -> tuple:
    """What a killed publish left, coarsely: the target's content and the kinds of paths beside it."""
    kinds = set()
    for n in leftovers(target):
        kind = n[len(target.name) + 2 :].split("-")[0]
        marked = (target.parent / n / STAGING_MARKER).exists()
        kinds.add(kind + ("+marker" if marked else ""))
    t = snapshot(target)
    return ("old" if t == before else "new" if t == new else "missing" if t is None else "other", tuple(sorted(kinds)))


@pytest.mark.parametrize("name", ["overwrite folder", "create-exclusive folder"])
def test_recovery_killed_at_any_step_is_finished_by_the_run_after_it(name, server, tmp_path):
    """For each distinct state a killed publish leaves under a journal, kill its recovery at every step."""
    before, new, action = SCENARIOS[name]
    states = {}
    for k, target in _kill_points(server, tmp_path / "probe", name):
        if journals(target):
            states.setdefault(_state(target, before, new), k)
    journaled = sorted(states.values())
    assert len(journaled) >= (5 if before is not None else 3), states
    tried = 0
    for k in journaled:  # each killed publish that left a journal ...
        for j in range(1, 100):  # ... with its recovery killed before its j-th mutation
            target = _prepare(tmp_path / f"k{k}-j{j}", name)
            assert server.run(action, target, kill_at=k) == KILLED
            code = server.run("recover", target, kill_at=j)
            tried += 1
            assert code in (KILLED, DONE), code
            clean_stale_staging(target)  # the run after it
            assert snapshot(target) == new, (k, j, snapshot(target))
            assert leftovers(target) == [], (k, j, leftovers(target))
            if code == DONE:
                break
    assert tried >= 2 * len(journaled), tried


def test_journal_identities_follow_the_content_not_the_name(server, tmp_path):
    """Recovery acts only on paths whose (device, inode) the journal recorded: a look-alike is never touched."""
    before, new, _ = SCENARIOS["overwrite folder"]
    for k, target in _kill_points(server, tmp_path, "overwrite folder"):
        if target.exists() or not journals(target):
            continue
        entry = json.loads(journals(target)[0].read_text())
        staged = target.parent / entry["new"]
        impostor = target.parent / "impostor"
        staged.rename(impostor)  # the user moved the new content away and put something else under its name
        staged.mkdir()
        (staged / "mine.txt").write_text("user's")
        clean_stale_staging(target)
        assert snapshot(target) == before  # the new content is not where the journal says: the old is restored
        assert snapshot(staged) == {"mine.txt": "user's"} and snapshot(impostor) == new
        return
    pytest.fail("no kill point left the target missing")


def test_unjournaled_old_copy_from_an_older_version_is_reported_never_removed(tmp_path, caplog):
    target = tmp_path / "out"
    old = tmp_path / ".out.old-0123abcd"  # what the older version left: target gone, old aside, no journal
    old.mkdir()
    write_tree(old, OLD_DIR)
    with caplog.at_level(logging.WARNING, logger="rolora_plugin.io.publish"):
        recover_interrupted(target)
    assert snapshot(old) == OLD_DIR and not target.exists()
    assert any(str(old) in r.getMessage() and "move it back" in r.getMessage() for r in caplog.records)


def test_a_failed_rollback_keeps_the_old_content_and_every_later_run_names_it(tmp_path, monkeypatch, caplog):
    """The final rename fails because another run's folder appeared at the target: the old content cannot go back;
    the error names where it is, and once this process is gone each later run names it again (never deletes it)."""
    target = _setup(tmp_path, OLD_DIR)
    real = publish.rename_noreplace

    def racing(src, dst):
        if Path(dst) == target and not target.exists() and Path(src).name.startswith(".out.tmp-"):
            target.mkdir()
            (target / "theirs.txt").write_text("another run")
        return real(src, dst)

    def run():
        publish.rename_noreplace = racing
        with atomic_output_dir(target, overwrite=True) as tmp:
            write_tree(tmp, NEW_DIR)

    assert in_child(run) == FAILED
    old = [tmp_path / n for n in leftovers(target) if ".old-" in n]
    assert len(old) == 1 and snapshot(old[0]) == OLD_DIR
    assert snapshot(target) == {"theirs.txt": "another run"}
    with caplog.at_level(logging.WARNING, logger="rolora_plugin.io.publish"):
        clean_stale_staging(target)
    assert any(str(old[0]) in r.getMessage() for r in caplog.records)
    for _ in range(2):  # named again by each later run (logged once per process), never removed
        assert any(str(old[0]) in what for what in recover_interrupted(target))
        assert snapshot(old[0]) == OLD_DIR and snapshot(target) == {"theirs.txt": "another run"}


def test_merge_and_export_overwrite_killed_between_its_renames_is_completed_by_the_next_run(tmp_path, caplog):
    """The reported case, end to end: ``merge_and_export(..., overwrite=True)`` killed after moving the old export
    aside and before renaming the new one in. The next run completes it: the target holds the new export, whole."""
    from rolora_plugin import merge_and_export, rotate_model_
    from tests.helpers import tiny_model

    model = tiny_model("llama")
    rotate_model_(model, progress=False)
    reference = merge_and_export(model, tmp_path / "reference")
    target = _setup(tmp_path, OLD_DIR)

    def export_killed_between_renames():
        real = publish.rename_noreplace

        def rename(src, dst):
            if Path(dst) == target and Path(src).name.startswith(".out.tmp-") and not target.exists():
                os._exit(KILLED)  # the old export is aside, the new one complete and not yet in place
            return real(src, dst)

        publish.rename_noreplace = rename
        merge_and_export(model, target, overwrite=True)

    assert in_child(export_killed_between_renames) == KILLED
    assert not target.exists() and journals(target)  # the reported state; now journaled
    assert OLD_DIR in [snapshot(tmp_path / n) for n in leftovers(target)]
    with caplog.at_level(logging.WARNING, logger="rolora_plugin.io.publish"):
        clean_stale_staging(target)  # what the next run for that target does first
    assert snapshot(target) == snapshot(reference) and leftovers(target) == []
    assert any("completed it" in r.getMessage() and str(target) in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------- races


def _killed_between_renames(server, tmp_path: Path) -> Path:
    """A folder overwrite killed with the target moved aside and the new content not yet in (the reported case)."""
    for k, target in _kill_points(server, tmp_path, "overwrite folder"):
        if not target.exists() and journals(target):
            return target
    raise AssertionError("no kill point left the target missing")


def test_two_recoverers_at_once_finish_the_publish_once(server, tmp_path):
    target = _killed_between_renames(server, tmp_path)
    go = tmp_path / "go"

    def recover():
        while not go.exists():
            time.sleep(0.001)
        clean_stale_staging(target)

    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = FAILED
            try:
                logging.disable(logging.CRITICAL)
                recover()
                code = DONE
            finally:
                os._exit(code)
        pids.append(pid)
    go.touch()
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [DONE, DONE]
    assert snapshot(target) == NEW_DIR and leftovers(target) == []


def test_a_live_publisher_is_never_recovered_by_another_run(tmp_path):
    """Paused right after moving the old content aside: another run's recovery must leave everything alone."""
    target = _setup(tmp_path, OLD_DIR)
    paused, go = tmp_path / "paused", tmp_path / "go"
    real_rename = os.rename

    def run():
        def pausing(src, dst, *a, **kw):
            real_rename(src, dst, *a, **kw)
            if Path(src) == target:  # the old content is aside; the new one not yet in
                paused.touch()
                while not go.exists():
                    time.sleep(0.005)

        os.rename = pausing
        with atomic_output_dir(target, overwrite=True) as tmp:
            write_tree(tmp, NEW_DIR)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = FAILED
        try:
            logging.disable(logging.CRITICAL)
            run()
            code = DONE
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 30
        while not paused.exists():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        seen = leftovers(target)
        assert not target.exists() and any(".old-" in n for n in seen) and journals(target)
        clean_stale_staging(target)  # another run, same target, while the owner lives
        assert leftovers(target) == seen and not target.exists()
    finally:
        go.touch()
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code == DONE
    assert snapshot(target) == NEW_DIR and leftovers(target) == []


def test_two_concurrent_overwriters_leave_one_whole_result_and_lose_nothing_silently(tmp_path):
    target = _setup(tmp_path, OLD_DIR)
    go = tmp_path / "go"

    def writer(tag):
        def run():
            while not go.exists():
                time.sleep(0.001)
            with atomic_output_dir(target, overwrite=True) as tmp:
                write_tree(tmp, {"who.txt": tag})

        return run

    for attempt in range(5):
        pids = []
        for tag in "ab":
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = FAILED
                try:
                    logging.disable(logging.CRITICAL)
                    writer(tag)()
                    code = DONE
                finally:
                    os._exit(code)
            pids.append(pid)
        go.touch()
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        go.unlink()
        assert snapshot(target) in ({"who.txt": "a"}, {"who.txt": "b"}), codes
        assert DONE in codes
        left = [n for n in leftovers(target) if ".publish-" not in n]
        if left:  # a loser's old content could not go back: kept aside, named by its journal, never deleted
            assert FAILED in codes and all(".old-" in n for n in left) and journals(target), (codes, left)
            assert all(snapshot(tmp_path / n) == OLD_DIR for n in left)  # it is the user's original, whole
            recover_interrupted(target)
            assert [n for n in leftovers(target) if ".publish-" not in n] == left
            for n in left + [j.name for j in journals(target)]:
                shutil.rmtree(tmp_path / n) if (tmp_path / n).is_dir() else (tmp_path / n).unlink()
        assert journals(target) == [] and leftovers(target) == []


# ---------------------------------------------------------------------------------------------- rolora train


@pytest.fixture(scope="module")
def train_work(tmp_path_factory) -> Path:
    from tests.app.fixtures import save_tiny

    work = tmp_path_factory.mktemp("lost-train")
    save_tiny(work / "tiny")
    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(4)]
    (work / "pairs.json").write_text(json.dumps(pairs))
    return work


def _train_cfg(work: Path, case: Path, output_dir: str, checkpoint_dir: str | None) -> Path:
    cfg = {"model": str(work / "tiny"), "dataset": str(work / "pairs.json"), "output_dir": output_dir,
           "max_steps": 2, "batch_size": 2, "seq_len": 64, "save_steps": 1, "logging_steps": 1, "save_merged": False,
           "rotate": False}  # fmt: skip
    if checkpoint_dir is not None:
        cfg["checkpoint_dir"] = checkpoint_dir
    path = case / "train.json"
    path.write_text(json.dumps(cfg))
    return path


# relation -> (output_dir, checkpoint_dir) relative to the case folder; "runs" holds the user's notes beforehand
RELATIONS = {
    "parent": ("runs/final", "runs"),
    "equal": ("runs/final", "runs/final"),
    "child": ("runs/final", "runs/final/ckpt"),
    "parent, spelt with ..": ("runs/final", "runs/final/.."),
    "parent through a symlink": ("runs/final", "link-to-runs"),
    "ancestor": ("runs/a/b/final", "runs"),
    "sibling": ("runs/final", "runs/ckpt"),
    "default": ("runs/final", None),
    "sibling, foreign file dropped in": ("runs/final", "runs/ckpt"),
}
REFUSED = {"parent", "equal", "child", "parent, spelt with ..", "parent through a symlink", "ancestor"}


@pytest.mark.parametrize("relation", list(RELATIONS))
def test_train_checkpoint_dir_relations(relation, train_work, tmp_path, monkeypatch, capsys, caplog):
    from rolora_plugin.app import train as train_mod
    from rolora_plugin.app.cli import EXIT_BAD_INPUT, main

    out_rel, ckpt_rel = RELATIONS[relation]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("the user's notes")
    (tmp_path / "link-to-runs").symlink_to(tmp_path / "runs")
    root = Path(ckpt_rel) if ckpt_rel else Path(out_rel + ".checkpoints")
    if relation.endswith("foreign file dropped in"):  # the user drops a file into the checkpoints while training
        real = train_mod._save_training

        def drop_then_save(*args, **kwargs):
            (root / "my-eval.txt").write_text("the user's eval")
            return real(*args, **kwargs)

        monkeypatch.setattr(train_mod, "_save_training", drop_then_save)
    cfg = _train_cfg(train_work, tmp_path, out_rel, ckpt_rel)
    before = snapshot(tmp_path / "runs")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        code = main(["-q", "train", str(cfg)])
    err = capsys.readouterr().err
    if relation in REFUSED:
        assert code == EXIT_BAD_INPUT, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "checkpoint_dir" in lines[0] and "output_dir" in lines[0], err
        assert "Traceback" not in err and time.monotonic() - start < 20
        assert snapshot(tmp_path / "runs") == before  # nothing written, nothing removed
        with pytest.raises(train_mod.TrainInputError, match="checkpoint_dir"):  # the library refuses it as well
            train_mod.TrainConfig.from_file(cfg)
        return
    assert code == 0, err
    published = Path(out_rel)
    assert (published / "adapter" / "adapter_model.safetensors").is_file() and (published / "train_log.json").is_file()
    assert (tmp_path / "runs" / "notes.txt").read_text() == "the user's notes"
    if relation.endswith("foreign file dropped in"):
        assert sorted(p.name for p in root.iterdir()) == ["my-eval.txt"]  # only what the run wrote is gone
        assert any(str(root) in r.getMessage() and "my-eval.txt" in r.getMessage() for r in caplog.records)
    else:
        assert not root.exists()


@pytest.fixture(scope="module")
def trained_root(train_work, tmp_path_factory) -> tuple[Path, Path]:
    """A real checkpoint folder of a finished run (copied just before its clean-up) and the published output."""
    from rolora_plugin.app import train as train_mod
    from rolora_plugin.app.cli import main

    case = tmp_path_factory.mktemp("cleanup")
    kept = case / "template"
    real = train_mod.remove_checkpoints

    def copy_then_clean(root, output_dir):
        shutil.copytree(root, kept)
        return real(root, output_dir)

    train_mod.remove_checkpoints = copy_then_clean
    try:
        cfg = _train_cfg(train_work, case, str(case / "run"), str(case / "ckpt"))
        assert main(["-q", "train", str(cfg)]) == 0
    finally:
        train_mod.remove_checkpoints = real
    assert {p.name for p in kept.iterdir()} >= {"checkpoint-1", "checkpoint-2", train_mod.RUN_CONFIG_FILE}
    return kept, case / "run"


@pytest.mark.parametrize("foreign", [False, True], ids=["only ours", "with a foreign file"])
def test_train_cleanup_killed_at_any_step_keeps_the_output_and_the_marker(foreign, trained_root, tmp_path):
    from rolora_plugin.app.train import RUN_CONFIG_FILE, remove_checkpoints

    template, output = trained_root
    published = snapshot(output)
    for k in range(1, 200):
        root = tmp_path / f"k{k}"
        shutil.copytree(template, root)
        if foreign:
            (root / "my-eval.txt").write_text("the user's eval")
        code = in_child(lambda root=root: remove_checkpoints(root, output), kill_at=k)
        assert code in (KILLED, DONE), code
        assert snapshot(output) == published
        if root.exists() and any(p.name.startswith("checkpoint-") for p in root.iterdir()):
            assert (root / RUN_CONFIG_FILE).is_file()  # cut short: checkpoints stay only in a folder marked as ours
        if foreign:
            assert (root / "my-eval.txt").read_text() == "the user's eval"
        left = remove_checkpoints(root, output)  # the rerun of the clean-up finishes it
        assert [p.name for p in left] == (["my-eval.txt"] if foreign else [])
        if code == DONE:
            assert (sorted(p.name for p in root.iterdir()) == ["my-eval.txt"]) if foreign else not root.exists()
            assert k > 5
            return
    pytest.fail("the clean-up never completed")


# relation of the checkpoint folder (holding our marker) to the output, when the up-front refusal is bypassed
CLEANUP_OVERLAPS = {"parent": ("runs", "runs/final"), "equal": ("runs/final", "runs/final"),
                    "child": ("runs/final/ckpt", "runs/final"), "unmarked sibling": ("runs/ckpt", "runs/final")}  # fmt: skip


@pytest.mark.parametrize("relation", list(CLEANUP_OVERLAPS))
def test_train_cleanup_never_touches_a_folder_overlapping_the_output_or_not_marked(relation, tmp_path):
    """The second line of defence: called directly (a config changed after the check), nothing is removed."""
    from rolora_plugin.app.train import RUN_CONFIG_FILE, remove_checkpoints

    root_rel, out_rel = CLEANUP_OVERLAPS[relation]
    root, out = tmp_path / root_rel, tmp_path / out_rel
    write_tree(out, {"adapter/adapter_model.safetensors": "published", "train_log.json": "{}"})
    write_tree(root, {"checkpoint-1/trainer_state.json": "{}", "notes.txt": "user"})
    if relation != "unmarked sibling":
        (root / RUN_CONFIG_FILE).write_text("{}")
    before = snapshot(tmp_path)
    remove_checkpoints(root, out)
    assert snapshot(tmp_path) == before
