"""Hostile and broken input for the trash journal and the image cleaner (issue 13, items 3, 6, 7 and 8).

- a crafted `.trash/journal.jsonl` or `cleaned.csv` whose paths lead outside the dataset folder (`..`,
  absolute paths, symbolic links) is refused with a clear error, and nothing moves;
- two cleaners on one folder: another process is refused with a message naming the holder; in the same
  kernel the newer cleaner takes over and the older one refuses to write (never a silent overwrite);
- SIGKILL at random moments of `apply()` and `undo()` (real forked processes): no file is lost, the journal
  explains every file's place, `cleaned.csv` agrees with the disk, and one `undo()` restores everything;
- a torn journal line (the writer died mid-line) is reported with a warning naming the file and the line,
  and the intact lines are used.
"""
import hashlib
import json
import multiprocessing
import os
import random
import signal
import socket
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from coursekit.vision.utils import (TRASH_FOLDER, FolderInUseError, TrashJournal, UnsafePathError, WriterReplacedError,
                                    verify_images)
from coursekit.vision.widgets import CleanerItem, CleanerState, ImageCleaner, read_cleaned
from journal_replay import replay

FORK = multiprocessing.get_context("fork")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    "{relative path: content digest} of every file under `folder` (hidden folders included, the lock file excluded)."
    return {p.relative_to(folder).as_posix(): digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != "lock"}


def images(folder: Path) -> dict:
    "{relative path: digest} of the image files under `folder`, trash included."
    return {k: v for k, v in snapshot(folder).items() if k.endswith(".png")}


def make_dataset(base: Path, per_class: int = 4) -> Path:
    root = base / "data"
    k = 0
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            k += 1
            Image.new("RGB", (4, 4), (k * 37 % 256, k * 11 % 256, k * 5 % 256)).save(root / cls / f"img_{j}.png")
    (base / "outside").mkdir()
    Image.new("RGB", (4, 4), "white").save(base / "outside" / "secret.png")
    return root


def write_journal(root: Path, entries: list):
    (root / TRASH_FOLDER).mkdir(exist_ok=True)
    (root / TRASH_FOLDER / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


# --- item 3: paths read from the journal or cleaned.csv must stay inside the dataset folder -------------

def crafted_journals(root: Path, base: Path):
    "Journal lines an attacker could write, each with what it would do on undo()."
    outside = base / "outside"
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / TRASH_FOLDER).mkdir(exist_ok=True)
    (root / TRASH_FOLDER / "evil.png").symlink_to(outside / "secret.png")
    move = {"batch": 1, "op": "move", "time": "2026-01-01T00:00:00+00:00", "reason": "crafted"}
    return {
        "moves a dataset file out (..)": [dict(move, src="../outside/stolen.png", dst="cats/img_0.png")],
        "pulls a file in (..)": [dict(move, src="cats/pulled.png", dst="../outside/secret.png")],
        "pulls a file in (absolute)": [dict(move, src="cats/pulled.png", dst=str(outside / "secret.png"))],
        "moves a dataset file out (absolute)": [dict(move, src=str(outside / "stolen.png"), dst="cats/img_0.png")],
        "pulls a file in (symlinked folder)": [dict(move, src="cats/pulled.png", dst="link/secret.png")],
        "moves a dataset file out (symlinked folder)": [dict(move, src="link/stolen.png", dst="cats/img_1.png")],
        "pulls a file in (symlink in the trash)": [dict(move, src="cats/pulled.png", dst=".trash/evil.png")],
        "undo line pointing outside": [dict(move, src="cats/img_2.png", dst=".trash/cats/img_2.png"),
                                       {"batch": 2, "op": "move", "src": "cats/img_3.png", "dst": "dogs/x.png",
                                        "time": "t", "reason": "r"},
                                       {"batch": 2, "op": "undo", "time": "t",
                                        "restored": {"dogs/img_0.png": "../outside/stolen2.png"}}],
    }


CRAFTED = ["moves a dataset file out (..)", "pulls a file in (..)", "pulls a file in (absolute)",
           "moves a dataset file out (absolute)", "pulls a file in (symlinked folder)",
           "moves a dataset file out (symlinked folder)", "pulls a file in (symlink in the trash)",
           "undo line pointing outside"]


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_journal_is_refused_and_nothing_moves(tmp_path, case):
    root = make_dataset(tmp_path)
    write_journal(root, crafted_journals(root, tmp_path)[case])
    before, outside_before = snapshot(root), snapshot(tmp_path / "outside")
    with pytest.raises(UnsafePathError, match="outside the dataset folder") as err:
        TrashJournal(root).undo()
    assert "journal.jsonl" in str(err.value) and "line" in str(err.value)
    with pytest.raises(UnsafePathError, match="outside the dataset folder"):
        ImageCleaner.from_folder(root)
    assert snapshot(root) == before and snapshot(tmp_path / "outside") == outside_before


def test_crafted_cleaned_csv_is_refused_and_nothing_moves(tmp_path):
    root = make_dataset(tmp_path)
    (root / TRASH_FOLDER).mkdir()
    (root / TRASH_FOLDER / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    outside_before = snapshot(tmp_path / "outside")
    for fname in (".trash/out/secret.png", ".trash/../../outside/secret.png", str(tmp_path / "outside" / "secret.png")):
        (root / "cleaned.csv").write_text(f"fname,label,is_valid,deleted,reviewed\n{fname},cats,False,True,True\n")
        before = snapshot(root)
        with pytest.raises(UnsafePathError, match="outside the dataset folder") as err:
            ImageCleaner.from_folder(root)
        assert "cleaned.csv" in str(err.value)
        with pytest.raises(UnsafePathError, match="outside the dataset folder"):
            read_cleaned(root)
        assert snapshot(root) == before and snapshot(tmp_path / "outside") == outside_before


def test_items_through_a_symlinked_folder_are_refused(tmp_path):
    "A DataFrame naming a file through a link to another folder: the cleaner must not move that file."
    root = make_dataset(tmp_path)
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="outside the dataset folder"):
        CleanerState(root, [CleanerItem("link/secret.png", "cats")])
    assert (tmp_path / "outside" / "secret.png").is_file()


def test_trash_folder_that_is_a_symlink_is_refused(tmp_path):
    "`.trash` linked to another folder would move deleted files out of the dataset."
    root = make_dataset(tmp_path)
    (root / TRASH_FOLDER).symlink_to(tmp_path / "outside", target_is_directory=True)
    before = snapshot(root)
    with pytest.raises(UnsafePathError, match="outside the dataset folder"):
        TrashJournal(root).to_trash("cats/img_0.png", "test", 1)
    with pytest.raises(UnsafePathError):
        verify_images(root, delete=True)
    assert snapshot(root) == before and (root / "cats" / "img_0.png").is_file()


def test_journal_or_cleaned_csv_that_is_a_symlink_is_refused(tmp_path):
    root = make_dataset(tmp_path)
    victim = tmp_path / "outside" / "victim.txt"
    victim.write_text("precious")
    (root / TRASH_FOLDER).mkdir()
    (root / TRASH_FOLDER / "journal.jsonl").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        TrashJournal(root).to_trash("cats/img_0.png", "test", 1)
    (root / TRASH_FOLDER / "journal.jsonl").unlink()
    (root / "cleaned.csv").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        ImageCleaner.from_folder(root)
    assert victim.read_text() == "precious" and (root / "cats" / "img_0.png").is_file()


def test_lock_file_that_is_a_symlink_is_never_written_through(tmp_path):
    root = make_dataset(tmp_path)
    (root / TRASH_FOLDER).mkdir()
    victim = tmp_path / "outside" / "victim.txt"
    victim.write_text("precious")
    (root / TRASH_FOLDER / "lock").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        ImageCleaner.from_folder(root)
    assert victim.read_text() == "precious"


# --- item 6: one writer at a time --------------------------------------------------------------------

def _open_in_child(root: Path, conn):
    try:
        CleanerState(root, [CleanerItem("cats/img_0.png", "cats")])
        conn.send(("opened", ""))
    except Exception as err:
        conn.send((type(err).__name__, str(err)))
    conn.close()


def in_child(target, *args, timeout: float = 30):
    "Run `target(*args, conn)` in a forked process; return what it sent."
    parent_conn, child_conn = FORK.Pipe()
    proc = FORK.Process(target=target, args=(*args, child_conn))
    proc.start()
    try:
        assert parent_conn.poll(timeout), "the child process did not answer"
        return parent_conn.recv()
    finally:
        proc.join(timeout)


def test_second_process_is_refused_with_the_holder_named(tmp_path):
    root = make_dataset(tmp_path)
    cleaner = ImageCleaner.from_folder(root)
    kind, message = in_child(_open_in_child, root)
    assert kind == FolderInUseError.__name__, (kind, message)
    assert f"process {os.getpid()}" in message and socket.gethostname() in message and "since" in message
    assert "close()" in message
    cleaner.close()
    kind, message = in_child(_open_in_child, root)
    assert kind == "opened", message  # after close() another process may open it


def _die_holding_the_lock(root: Path, conn):
    state = CleanerState(root, [CleanerItem("cats/img_0.png", "cats")])
    conn.send(("opened", state.root.name))
    os.kill(os.getpid(), signal.SIGKILL)


def test_lock_of_a_killed_process_is_recovered(tmp_path):
    root = make_dataset(tmp_path)
    assert in_child(_die_holding_the_lock, root)[0] == "opened"
    time.sleep(0.2)
    assert "pid" in (root / TRASH_FOLDER / "lock").read_text()  # the dead holder's note is still there
    ImageCleaner.from_folder(root)  # a dead holder does not block


def test_same_kernel_newer_cleaner_takes_over_and_older_refuses(tmp_path):
    root = make_dataset(tmp_path)
    a = ImageCleaner.from_folder(root)
    names = [it.fname for it in a.state.items]
    a.state.delete(names.index("cats/img_0.png"))
    b = ImageCleaner.from_folder(root)  # the same cell run again
    assert b.state.decisions()["cats/img_0.png"] == ("cats", True, True)
    csv = (root / "cleaned.csv").read_text()
    with pytest.raises(WriterReplacedError, match="newer"):
        a.state.delete(names.index("cats/img_1.png"))
    with pytest.raises(WriterReplacedError):
        a.state.apply()
    assert (root / "cleaned.csv").read_text() == csv
    a.tiles[1].delete_button.click()  # a click in the old widget says what happened instead of failing
    assert "newer" in a.message.value and a.apply_button.disabled
    b.state.delete(names.index("dogs/img_0.png"))
    b.apply()
    df = read_cleaned(root, drop_deleted=False).set_index("fname")
    assert bool(df.loc[".trash/cats/img_0.png", "deleted"]) and bool(df.loc[".trash/dogs/img_0.png", "deleted"])
    assert not bool(df.loc["cats/img_1.png", "deleted"])
    b.close()
    with pytest.raises(WriterReplacedError, match="closed"):
        b.state.keep(0)


def test_verify_images_in_the_same_kernel_takes_over_from_a_cleaner(tmp_path):
    root = make_dataset(tmp_path)
    (root / "cats" / "broken.png").write_bytes(b"not a png")
    cleaner = ImageCleaner.from_folder(root)
    check = verify_images(root, delete=True)
    assert list(check.moved.values()) == [".trash/cats/broken.png"]
    with pytest.raises(WriterReplacedError):
        cleaner.state.delete(0)
    kind, message = in_child(_open_in_child, root)
    assert kind == "opened", message  # verify_images let go of the folder when it finished


# --- item 7: SIGKILL during apply() and undo() -------------------------------------------------------

def check_consistent(root: Path, start: dict, context: str = ""):
    "No file lost or duplicated; the journal explains every file's place; cleaned.csv agrees with the disk."
    now = images(root)
    assert Counter(now.values()) == Counter(start.values()), f"{context}: a file was lost or duplicated"
    assert replay(root, start) == now, f"{context}: the journal does not explain where the files are"
    listed = set(read_cleaned(root, drop_deleted=False).fname)
    assert listed == set(now), (f"{context}: cleaned.csv does not list the files where they are: "
                                f"not listed {sorted(set(now) - listed)}, listed but absent {sorted(listed - set(now))}")


def folder_items(root: Path) -> list:
    return [CleanerItem(p.relative_to(root).as_posix(), p.parent.name) for p in sorted(root.glob("*/*.png"))]


def _act_in_child(root: Path, action: str, conn):
    state = CleanerState(root, lambda: folder_items(root), folder_labels=True)
    conn.send("ready")
    getattr(state, action)()
    conn.send("done")
    os._exit(0)


def progress(root: Path, action: str) -> int:
    "How far an apply (journal lines written) or an undo (files out of the trash) has gone."
    if action == "apply":
        journal = root / TRASH_FOLDER / "journal.jsonl"
        return journal.read_bytes().count(b"\n") if journal.exists() else 0
    return -sum(1 for p in (root / TRASH_FOLDER).rglob("*.png"))


def run_and_kill(root: Path, action: str, after: int, rng: random.Random) -> bool:
    "Start `action` ('apply' or 'undo') in a forked process; SIGKILL it once it made `after` steps; True if it finished first."
    start = progress(root, action)
    parent_conn, child_conn = FORK.Pipe()
    proc = FORK.Process(target=_act_in_child, args=(root, action, child_conn))
    proc.start()
    assert parent_conn.poll(30) and parent_conn.recv() == "ready"
    deadline = time.time() + 30
    while progress(root, action) - start < after and not parent_conn.poll(0) and time.time() < deadline:
        time.sleep(0.0002)
    time.sleep(rng.uniform(0, 0.002))  # land anywhere: between a line and its move, inside a move, between moves
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    finished = False
    while parent_conn.poll(0):
        finished = parent_conn.recv() == "done"
    return finished


def decide_randomly(root: Path, rng: random.Random) -> int:
    "Random decisions for every file (written to cleaned.csv at once); returns how many files apply() will move."
    state = CleanerState(root, lambda: folder_items(root), folder_labels=True)
    for i in range(len(state.items)):
        choice = rng.random()
        state.reviewed[i] = True
        state.deleted[i] = choice < 0.5
        if 0.5 <= choice < 0.8:
            state.labels[i] = rng.choice(["cats", "dogs", "birds"])
    state.save()
    to_move = sum(state._target(i) is not None for i in range(len(state.items)))
    state.close()
    return to_move


def test_sigkill_during_apply_and_undo_loses_nothing_and_undo_restores_everything(tmp_path):
    rng = random.Random(13)
    root = make_dataset(tmp_path, per_class=10)
    start = images(root)
    figures = Counter()
    deadline = time.time() + 40
    for trial in range(80):
        if time.time() > deadline and trial >= 30: break
        action = "apply" if trial % 3 else "undo"
        to_move = decide_randomly(root, rng)
        if action == "undo":  # something to undo: a complete apply, then the kill during its undo
            state = CleanerState(root, lambda: folder_items(root), folder_labels=True)
            to_move = sum(1 for k in state.apply().values() if k.startswith(TRASH_FOLDER + "/"))
            state.close()
        after = rng.randint(0, max(1, to_move))
        finished = run_and_kill(root, action, after, rng)
        figures[f"{action} kills"] += 1
        figures[f"{action} finished before the kill"] += finished
        state = CleanerState(root, lambda: folder_items(root), folder_labels=True)  # reopening recovers
        context = f"trial {trial}, kill during {action} after {after} steps"
        check_consistent(root, start, context)
        moved_away = sum(1 for k in images(root) if k not in start)
        figures["kills that left files moved"] += 0 < moved_away and not finished
        state.undo()
        state.close()
        assert images(root) == start, f"{context}: one undo() did not restore every file"
        check_consistent(root, start, context + ", then undo()")
    print(dict(figures))
    assert figures["apply kills"] + figures["undo kills"] >= 30
    assert figures["kills that left files moved"] >= 10, "too few kills landed in the middle of an apply or undo"


# --- item 8: a torn journal line ----------------------------------------------------------------------

def test_torn_journal_line_is_reported_and_the_rest_works(tmp_path):
    root = make_dataset(tmp_path)
    journal = TrashJournal(root)
    journal.to_trash("cats/img_0.png", "first", journal.new_batch())
    with open(journal.path, "a") as f:
        f.write('{"batch": 2, "op": "move", "src": "cats/im')  # the writer died here
    (root / "dogs" / "broken.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match=r"journal\.jsonl.*line 2"):
        check = verify_images(root, delete=True)
    assert list(check.moved.values()) == [".trash/dogs/broken.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entries = TrashJournal(root).entries()
        assert [e["src"] for e in entries if e["op"] == "move"] == ["cats/img_0.png", "dogs/broken.png"]
        cleaner = ImageCleaner.from_folder(root)
        cleaner.state.delete(0)
        cleaner.apply()
        assert cleaner.undo()
        assert TrashJournal(root).undo(1) == {".trash/cats/img_0.png": "cats/img_0.png"}


def test_journal_line_that_is_not_utf8_counts_as_torn(tmp_path):
    root = make_dataset(tmp_path)
    journal = TrashJournal(root)
    journal.to_trash("cats/img_0.png", "first", journal.new_batch())
    with open(journal.path, "ab") as f:
        f.write(b'{"batch": 2, "op": "move", "src": "\xff\xfe')
    with pytest.warns(UserWarning, match="line 2"):
        assert TrashJournal(root).undo() == {".trash/cats/img_0.png": "cats/img_0.png"}


def test_unreadable_lock_note_still_names_the_lock(tmp_path):
    root = make_dataset(tmp_path)
    cleaner = ImageCleaner.from_folder(root)
    (root / TRASH_FOLDER / "lock").write_bytes(b"\x00garbage")  # the holder's note, overwritten
    kind, message = in_child(_open_in_child, root)
    assert kind == FolderInUseError.__name__ and "lock" in message, (kind, message)
    cleaner.close()


def test_journal_line_that_is_json_but_not_an_entry_is_refused(tmp_path):
    root = make_dataset(tmp_path)
    for bad in (["cats/img_0.png"], {"batch": "1", "op": "move", "src": "cats/img_0.png", "dst": "x.png"},
                {"batch": 1, "op": "move", "src": "cats/img_0.png"}, {"batch": 1, "op": "rm", "src": "cats/img_0.png"}):
        (root / TRASH_FOLDER).mkdir(exist_ok=True)
        (root / TRASH_FOLDER / "journal.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=r"journal\.jsonl, line 1"):
            TrashJournal(root).undo()
    assert (root / "cats" / "img_0.png").is_file()
