"""Property test of the image cleaner: random sequences of widget actions on a temporary folder.

Hypothesis drives the `ImageCleaner` the way a user would (Keep / Delete buttons, the relabel box, the
class and split filters, next / previous page, Apply, Undo, and closing and reopening the cleaner), and
the way things go wrong: a second cleaner opened on the same folder in the same kernel (the older one
must refuse to write), a cleaner in another process (refused while this one is open), and an Apply or
Undo in another process killed with SIGKILL at a random point, after which the cleaner is reopened.
A separate model records what the user decided, keyed by each file's content. After every action:
- no file is lost: the files under the dataset folder (trash included) are exactly the ones we started
  with, and the files outside it are untouched;
- every file is where the journal says: the start positions, replayed through every move and undo line
  carried out, give exactly the files on disk (so every file is in place, or moved with a journal line);
- `cleaned.csv` on disk matches the decisions: one row per file, each row's `fname` is where that file is,
  with the label, deleted and reviewed flags the user chose;
- after Apply the folders match the decisions (deleted files in `.trash/`, kept ones in their class folder).
The figures (actions tried, files lost) are printed and written to `test-artifacts/cleaner_property.json`.
"""
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from PIL import Image

from coursekit.vision.utils import TRASH_FOLDER, FolderInUseError
from coursekit.vision.widgets import ImageCleaner, read_cleaned
from journal_replay import replay

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAGE_SIZE = 3
KILLS_PER_RUN = 3  # each kill forks a process: a few per sequence keep the test near a minute
LABELS = ["cats", "dogs", "birds"]  # "birds" is a new class: relabelling to it creates a folder
FIGURES = Counter()
FORK = multiprocessing.get_context("fork")


def digest(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(folder: Path) -> Counter:
    "Content digests of every image file under `folder` (trash included), with multiplicity."
    return Counter(digest(p) for p in folder.rglob("*.png") if p.is_file())


def positions(folder: Path) -> dict:
    "{relative path: content digest} of every image file under `folder`, trash included."
    return {p.relative_to(folder).as_posix(): digest(p) for p in folder.rglob("*.png") if p.is_file()}


def _act_in_child(root: Path, action: str, conn):
    state = ImageCleaner.from_folder(root, page_size=PAGE_SIZE).state
    conn.send("ready")
    getattr(state, action)()
    os._exit(0)


def _open_in_child(root: Path, conn):
    try:
        ImageCleaner.from_folder(root, page_size=PAGE_SIZE)
        conn.send("opened")
    except FolderInUseError as err:
        conn.send(str(err))
    os._exit(0)


def make_dataset(base: Path) -> Path:
    "Two classes in train/ and valid/, with the same file names in both classes so that moves collide."
    root, k = base / "data", 0
    for split, n in (("train", 4), ("valid", 2)):
        for cls in ("cats", "dogs"):
            (root / split / cls).mkdir(parents=True)
            for j in range(n):
                k += 1
                Image.new("RGB", (8, 8), (k * 7 % 256, k * 13 % 256, k * 29 % 256)).save(root / split / cls / f"img_{j}.png")
    (base / "outside").mkdir()
    Image.new("RGB", (8, 8), "white").save(base / "outside" / "mine.png")
    return root


class CleanerMachine(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.base = Path(tempfile.mkdtemp(prefix="cleaner-prop-"))
        self.root = make_dataset(self.base)
        self.start_files = all_files(self.root)
        self.start_positions = positions(self.root)
        self.outside = all_files(self.base / "outside")
        self.cleaner = ImageCleaner.from_folder(self.root, page_size=PAGE_SIZE)
        self.stale = None  # an older cleaner on the same folder, replaced by a newer one in this process
        self.kills = 0
        # the model: what the user decided, keyed by file content
        self.decided = {digest(self.root / it.fname): [it.data_label, False, False] for it in self.cleaner.state.items}
        self.just_applied = False

    def teardown(self):
        shutil.rmtree(self.base, ignore_errors=True)

    def _tile(self, k):
        tile = self.cleaner.tiles[k]
        return None if tile.i is None else tile

    def _key(self, tile): return digest(self.cleaner.state.root / self.cleaner.state.items[tile.i].fname)

    def _count(self, name): FIGURES["actions tried"] += 1; FIGURES[name] += 1; self.just_applied = False

    @rule(k=st.integers(0, PAGE_SIZE - 1))
    def delete(self, k):
        self._count("delete")
        tile = self._tile(k)
        if tile is None: return
        key = self._key(tile)
        tile.delete_button.click()
        self.decided[key][1:] = [True, True]

    @rule(k=st.integers(0, PAGE_SIZE - 1))
    def keep(self, k):
        self._count("keep")
        tile = self._tile(k)
        if tile is None: return
        key = self._key(tile)
        tile.keep_button.click()
        self.decided[key][1:] = [False, True]

    @rule(k=st.integers(0, PAGE_SIZE - 1), label=st.sampled_from(LABELS))
    def relabel(self, k, label):
        self._count("relabel")
        tile = self._tile(k)
        if tile is None: return
        key = self._key(tile)
        tile.label_box.value = label
        if label != self.decided[key][0]: self.decided[key] = [label, False, True]

    @rule(forward=st.booleans())
    def page(self, forward):
        self._count("page")
        (self.cleaner.next_button if forward else self.cleaner.prev_button).click()

    @rule(label=st.sampled_from(["", "cats", "dogs"]), split=st.sampled_from(["", "train", "valid"]))
    def filter(self, label, split):
        self._count("filter")
        self.cleaner.class_filter.value = label
        self.cleaner.split_filter.value = split

    @rule()
    def apply(self):
        self._count("apply")
        self.cleaner.apply_button.click()
        self.just_applied = True

    @rule()
    def undo(self):
        self._count("undo")
        self.cleaner.undo_button.click()

    @rule()
    def reopen(self):
        "Close the cleaner and open a new one on the same folder, as after a kernel restart."
        self._count("reopen")
        self.cleaner.close()
        self.cleaner = ImageCleaner.from_folder(self.root, page_size=PAGE_SIZE)
        self.stale = None

    @rule()
    def open_second(self):
        "Open another cleaner on the same folder without closing the first (the same cell run twice)."
        self._count("second cleaner")
        self.stale, self.cleaner = self.cleaner, ImageCleaner.from_folder(self.root, page_size=PAGE_SIZE)

    @rule(k=st.integers(0, PAGE_SIZE - 1), action=st.sampled_from(["delete", "keep", "apply", "undo"]))
    def use_stale(self, k, action):
        "Click in the older cleaner: it must say it was replaced and change nothing."
        self._count("stale click")
        if self.stale is None: return
        before = (self.root / "cleaned.csv").read_bytes(), positions(self.root)
        if action in ("apply", "undo"):
            getattr(self.stale, f"{action}_button").click()
        elif self.stale.tiles[k].i is not None:
            getattr(self.stale.tiles[k], f"{action}_button").click()
        else:
            return
        assert "newer" in self.stale.message.value, self.stale.message.value
        assert ((self.root / "cleaned.csv").read_bytes(), positions(self.root)) == before

    @rule()
    def other_process(self):
        "A cleaner in another notebook is refused while this one is open, with a message naming this process."
        self._count("other process")
        parent_conn, child_conn = FORK.Pipe()
        proc = FORK.Process(target=_open_in_child, args=(self.root, child_conn))
        proc.start()
        answer = parent_conn.recv() if parent_conn.poll(30) else "no answer"
        proc.join(10)
        assert f"process {os.getpid()}" in answer, answer

    @precondition(lambda self: self.kills < KILLS_PER_RUN)
    @rule(action=st.sampled_from(["apply", "undo"]), steps=st.integers(0, 8), wait=st.floats(0, 0.003))
    def kill(self, action, steps, wait):
        "Apply or Undo in another process (this cleaner closed first), killed with SIGKILL midway; then reopen."
        self._count("kill")
        self.kills += 1
        self.cleaner.close()
        self.stale = None
        journal = self.root / TRASH_FOLDER / "journal.jsonl"
        lines = lambda: journal.read_bytes().count(b"\n") if journal.exists() else 0
        parent_conn, child_conn = FORK.Pipe()
        proc = FORK.Process(target=_act_in_child, args=(self.root, action, child_conn))
        proc.start()
        assert parent_conn.poll(30) and parent_conn.recv() == "ready"
        start, deadline = lines(), time.time() + 10
        while lines() - start < steps and proc.is_alive() and time.time() < deadline:
            time.sleep(0.0002)
        time.sleep(wait)
        if proc.is_alive():  # it may have finished already: nothing to do then
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        self.cleaner = ImageCleaner.from_folder(self.root, page_size=PAGE_SIZE)  # reopening finishes what was half done

    @invariant()
    def no_file_lost(self):
        if not hasattr(self, "root"): return
        now = all_files(self.root)
        lost = sum((self.start_files - now).values())
        FIGURES["files lost"] += lost
        assert lost == 0, f"{lost} files lost"
        assert now == self.start_files, "files appeared that were not there before"
        assert all_files(self.base / "outside") == self.outside, "a file outside the dataset folder changed"

    @invariant()
    def journal_explains_every_place(self):
        if not hasattr(self, "root"): return
        assert replay(self.root, self.start_positions) == positions(self.root), "a file moved without a journal line"

    @invariant()
    def csv_matches_decisions(self):
        if not hasattr(self, "root"): return
        df = read_cleaned(self.root, drop_deleted=False)
        assert len(df) == len(self.decided), f"{len(df)} rows for {len(self.decided)} files"
        seen = {}
        for row in df.itertuples():
            path = self.root / row.fname
            assert path.is_file(), f"cleaned.csv says {row.fname} but there is no such file"
            seen[digest(path)] = [row.label, row.deleted, row.reviewed]
        assert seen == self.decided, "cleaned.csv does not match the decisions"
        assert self.cleaner.counter.value.startswith(f"{sum(r for _, _, r in self.decided.values())} of {len(self.decided)}")
        if self.just_applied:
            for row in df.itertuples():
                in_trash = row.fname.startswith(TRASH_FOLDER + "/")
                assert in_trash == row.deleted, f"after apply, {row.fname} is {'' if in_trash else 'not '}in the trash"
                if not row.deleted: assert Path(row.fname).parent.name == row.label, f"{row.fname} is not in {row.label}/"


def test_cleaner_never_loses_files_and_csv_matches_decisions():
    FIGURES.clear()
    run_state_machine_as_test(CleanerMachine, settings=settings(
        max_examples=30, stateful_step_count=30, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    figures = {"actions tried": FIGURES["actions tried"], "files lost": FIGURES["files lost"],
               "by action": {k: v for k, v in sorted(FIGURES.items()) if k not in ("actions tried", "files lost")}}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "cleaner_property.json").write_text(json.dumps(figures, indent=1))
    print(f"\ncleaner property test: {figures}")
    assert figures["actions tried"] >= 500, "too few actions were tried to mean anything"
    assert figures["by action"]["apply"] > 0 and figures["by action"]["undo"] > 0
    assert figures["by action"]["kill"] >= 15 and figures["by action"]["stale click"] > 0
    assert figures["files lost"] == 0
