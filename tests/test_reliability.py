"""Reliability and security of the learner's files and of Ctrl-C: `Learner.save/load`, `export`,
`load_learner`, and interrupting `fit`.

What DESIGN.md promises and these tests hold `coursekit.learner` to:
- saves and exports are atomic: a crash while writing leaves the previous file as it was, and no
  temporary file behind;
- loading an export never executes code from the file: only registered coursekit builders are called,
  nothing is unpickled;
- bad input gets a clear error that says what was wrong (which file, which part of it);
- interrupting training leaves the learner usable with the weights it had reached.

Everything runs on the CPU with a 3-8-2 MLP (`coursekit.learner.simple_mlp`) and 96 synthetic points.
"""
import errno
import json
import os
import pickle
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from coursekit.core import exportable_spec
from coursekit.data.core import DataLoaders
from coursekit.learner import (Callback, LRFinder, ParamScheduler, ProgressCallback, Learner, load_learner,
                               simple_mlp)

MEMBERS = ("model.safetensors", "model.json", "data.json", "learner.json")
# The errors a user may get from a damaged or tampered export: anything else (zlib.error, EOFError,
# AttributeError, a Rust panic...) is a crash of the loader, not an explanation.
LOAD_ERRORS = (ValueError, KeyError, RuntimeError, TypeError, zipfile.BadZipFile)


# --- tiny data, model and learner ---------------------------------------------------------------

def make_dls(bs: int = 16) -> DataLoaders:
    "96 points in 3-d, class 'pos' when x0 + x1 - x2 > 0; 64 for training, 32 for validation."
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=g)
    y = (x[:, 0] + x[:, 1] - x[:, 2] > 0).long()
    return DataLoaders.from_dsets(TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:]), bs=bs,
                                  device="cpu", vocab=["neg", "pos"])


def make_learner(path, cbs=(), lr: float = 1e-2) -> Learner:
    torch.manual_seed(0)
    learn = Learner(make_dls(), simple_mlp(3, 2, hidden=[8]), lr=lr, path=path, cbs=list(cbs))
    learn.model_spec = exportable_spec(simple_mlp, n_in=3, n_out=2, hidden=[8])
    return learn


def quiet_fit(learn: Learner, n_epoch: int = 1, **kwargs):
    with learn.no_bar():
        learn.fit(n_epoch, **kwargs)


def weights(learn: Learner) -> dict:
    return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


INPUTS = torch.tensor([[0.5, -2.0, 1.0], [3.0, 1.0, -1.0], [-1.0, -1.0, 2.0], [0.1, 0.2, 0.3]])


def predictions(learn: Learner):
    "Probabilities and labels for INPUTS, through the learner's own test loader."
    probs, _ = learn.get_preds(dl=learn.dls.test_dl(list(INPUTS)))
    return probs, [learn.predict(x)[0] for x in INPUTS]


def files_in(folder: Path) -> list:
    return sorted(p.name for p in Path(folder).iterdir())


# --- evidence that nothing from a file was executed -------------------------------------------------

class Payload:
    "Unpickling this creates `path`: if the marker file exists, code from a file ran."
    def __init__(self, path): self.path = str(path)
    def __reduce__(self): return (open, (self.path, "w"))


class _Audit:
    "Python audit events that mean code was loaded or run; recorded only while `active`."
    DANGEROUS = ("pickle.find_class", "os.system", "subprocess.Popen", "os.posix_spawn", "os.exec", "os.spawn",
                 "os.fork", "ctypes.dlopen")
    active, seen, installed = False, [], False

    @classmethod
    def hook(cls, event, args):
        if cls.active and event in cls.DANGEROUS:
            cls.seen.append((event, repr(args)[:200]))


@pytest.fixture
def no_code_runs():
    "Fails the test if, while it runs, anything is unpickled or a process is started."
    if not _Audit.installed:
        sys.addaudithook(_Audit.hook)
        _Audit.installed = True
    _Audit.seen, _Audit.active = [], True
    yield _Audit
    _Audit.active = False
    assert not _Audit.seen, f"code from a file may have run: {_Audit.seen}"


# --- exports to tamper with ----------------------------------------------------------------------

class Exported(tuple):
    "`(file, its members as bytes, the learner's predictions on INPUTS)`, with a short repr for Hypothesis' reports."
    def __repr__(self): return f"Exported({self[0].name})"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Exported:
    "A trained learner's export, made once for the module."
    folder = tmp_path_factory.mktemp("export")
    learn = make_learner(folder)
    quiet_fit(learn, 2)
    file = learn.export()
    with zipfile.ZipFile(file) as z:
        members = {n: z.read(n) for n in z.namelist()}
    assert sorted(members) == sorted(MEMBERS)
    return Exported((file, members, predictions(learn)))


def write_zip(file: Path, members: dict) -> Path:
    with zipfile.ZipFile(file, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return file


def load_error(file: Path) -> BaseException:
    "The exception `load_learner(file)` raises; fails the test if it loads."
    try:
        learn = load_learner(file, device="cpu")
    except BaseException as e:  # noqa: BLE001 - a Rust panic or KeyboardInterrupt must be reported, not crash pytest
        return e
    pytest.fail(f"load_learner accepted {file.name}, got a learner with model {type(learn.model).__name__}")


def message(exc: BaseException) -> str:
    "The error's text with its notes (`add_note`): everything the user reads."
    return "\n".join([str(exc), *getattr(exc, "__notes__", [])])


def assert_clear_load_error(exc: BaseException, file: Path, *details: str):
    "One of LOAD_ERRORS, whose message mentions each of `details` (which builder, member, parameter...)."
    assert isinstance(exc, LOAD_ERRORS), \
        f"load_learner({file.name}) raised {type(exc).__module__}.{type(exc).__qualname__}: {exc!r}"
    text = message(exc)
    assert text.strip(), f"{type(exc).__name__} without a message"
    for d in details:
        assert d in text, f"the error does not mention {d!r}: {text!r}"


# === 1. atomic saves and exports ==========================================================

class DiskFull(OSError):
    def __init__(self): super().__init__(errno.ENOSPC, "No space left on device (simulated)")


@pytest.mark.parametrize("crash", [DiskFull, KeyboardInterrupt])
def test_save_crash_keeps_previous_checkpoint(tmp_path, monkeypatch, crash):
    learn = make_learner(tmp_path)
    quiet_fit(learn)
    file = learn.save("stage")
    saved, saved_bytes = weights(learn), file.read_bytes()
    quiet_fit(learn, lr=0.5)
    assert not torch.equal(learn.model[0].weight, saved["0.weight"])

    real_save, seen_target = torch.save, []
    def half_save(obj, f, *args, **kwargs):
        "Write half of the real checkpoint, check the target is untouched meanwhile, then crash."
        buf = tempfile.TemporaryFile()
        real_save(obj, buf)
        buf.seek(0)
        data = buf.read()
        f.write(data[:len(data) // 2])
        f.flush()
        seen_target.append(file.read_bytes())
        raise crash()
    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(crash):
        learn.save("stage")
    monkeypatch.undo()

    assert seen_target == [saved_bytes], "save wrote into the checkpoint itself, not into a temporary file"
    assert file.read_bytes() == saved_bytes
    assert files_in(file.parent) == ["stage.pth"], "a temporary file was left behind"
    learn.load("stage")
    assert_same_weights(weights(learn), saved)


def test_first_save_crash_leaves_nothing(tmp_path, monkeypatch):
    learn = make_learner(tmp_path)
    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise DiskFull()
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(DiskFull):
        learn.save("first")
    assert files_in(tmp_path / "models") == [], "a half-written or temporary file was left behind"


@pytest.mark.parametrize("crash", [DiskFull, KeyboardInterrupt])
def test_export_crash_keeps_previous_export(tmp_path, monkeypatch, crash):
    learn = make_learner(tmp_path)
    quiet_fit(learn)
    file = learn.export("model.ck")
    old_bytes, old_preds = file.read_bytes(), predictions(learn)
    quiet_fit(learn, lr=0.5)

    real_writestr, calls = zipfile.ZipFile.writestr, []
    def writestr_then_crash(self, name, data, *args, **kwargs):
        "Write the first member for real, then crash on the second (a half-written zip)."
        calls.append(name)
        if len(calls) == 2:
            assert file.read_bytes() == old_bytes, "export is writing into the old export itself"
            raise crash()
        return real_writestr(self, name, data, *args, **kwargs)
    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr_then_crash)
    with pytest.raises(crash):
        learn.export("model.ck")
    monkeypatch.undo()

    assert len(calls) == 2, f"the simulated crash did not happen mid-export: {calls}"
    assert file.read_bytes() == old_bytes
    assert files_in(tmp_path) == ["model.ck"], "a temporary file was left behind"
    probs, labels = predictions(load_learner(file, device="cpu"))
    assert torch.equal(probs, old_preds[0]) and labels == old_preds[1]


def test_failed_rename_keeps_previous_file(tmp_path, monkeypatch):
    "Even the last step can fail (e.g. the target is locked): the old file stays, the temporary goes."
    learn = make_learner(tmp_path)
    file = learn.export("model.ck")
    old_bytes = file.read_bytes()
    def refuse(src, dst): raise PermissionError(errno.EACCES, "Permission denied (simulated)", str(dst))
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        learn.export("model.ck")
    monkeypatch.undo()
    assert file.read_bytes() == old_bytes and files_in(tmp_path) == ["model.ck"]


@pytest.mark.parametrize("kind", ["save", "export"])
def test_written_files_get_the_usual_permissions(tmp_path, kind):
    """The atomic write must not change who can read the file: a checkpoint or export gets the mode
    any file written with `open(..., "wb")` gets (0o666 minus the umask), e.g. so that a web server
    running as another user can serve an export. (`tempfile.mkstemp` creates 0o600 files.)"""
    learn = make_learner(tmp_path)
    file = learn.save("stage") if kind == "save" else learn.export()
    plain = tmp_path / "plain.bin"
    with open(plain, "wb") as f:
        f.write(b"x")
    assert oct(file.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777)


# === 2. load_learner refuses tampered exports, executes nothing ===========================

@pytest.mark.parametrize("builder", ["os:system", "builtins:eval", "builtins:exec", "subprocess:run",
                                     "coursekit.core:set_seed", "coursekit.core:build_exportable",
                                     "coursekit.learner:Learner", "coursekit.evil:run", "coursekitevil:run"])
@pytest.mark.parametrize("member", ["model.json", "data.json"])
def test_refuses_builders_outside_the_registry(tmp_path, exported, no_code_runs, builder, member):
    _, members, _ = exported
    marker = tmp_path / "executed"
    spec = {"builder": builder, "kwargs": {"command": f"touch {marker}", "source": f"open({str(marker)!r}, 'w')"}}
    if member == "data.json":  # hide the bad builder inside the data spec, as one of its blocks
        spec = json.loads(members["data.json"])
        spec["kwargs"]["blocks"][0] = {"builder": builder, "kwargs": {"command": f"touch {marker}"}}
    file = write_zip(tmp_path / "tampered.ck", {**members, member: json.dumps(spec)})
    exc = load_error(file)
    assert not marker.exists(), "load_learner ran code named in the export"
    assert isinstance(exc, ValueError), f"expected a ValueError refusing {builder}, got {type(exc).__name__}: {exc}"
    assert builder in str(exc), f"the error does not name the refused builder {builder!r}: {exc}"


def test_refuses_a_registered_builder_that_does_not_build_a_model(tmp_path, exported):
    "model.json naming the data builder must be refused clearly, not fail with an AttributeError."
    _, members, _ = exported
    file = write_zip(tmp_path / "swapped.ck", {**members, "model.json": members["data.json"]})
    assert_clear_load_error(load_error(file), file)


@pytest.mark.parametrize("extra", ["evil.pkl", "weights.pth", "../../evil.pkl", "ABSOLUTE/evil.pkl", "sub/../../evil.pkl"])
def test_refuses_unexpected_members(tmp_path, exported, no_code_runs, extra):
    """An export holds exactly its four members: a pickle or a member whose name climbs out of its
    folder is a sign of tampering and must be refused, naming the member (and nothing is run or written)."""
    _, members, _ = exported
    extra = extra.replace("ABSOLUTE", str(tmp_path))  # an absolute name, pointing into this test's folder
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    marker = tmp_path / "executed"
    file = write_zip(folder / "tampered.ck", {**members, extra: pickle.dumps(Payload(marker))})
    assert extra in zipfile.ZipFile(file).namelist()
    exc = load_error(file)
    assert not marker.exists(), "load_learner unpickled a member"
    assert files_in(tmp_path) == ["a"] and files_in(folder) == ["tampered.ck"], "load_learner wrote files"
    assert_clear_load_error(exc, file, extra)


@pytest.mark.parametrize("member", MEMBERS)
def test_refuses_a_pickle_in_place_of_a_member(tmp_path, exported, no_code_runs, member):
    "Each member replaced by a pickle (as `torch.save` writes it) that would create a marker if unpickled."
    _, members, _ = exported
    marker = tmp_path / "executed"
    with tempfile.TemporaryFile() as f:
        torch.save({"model": Payload(marker)}, f)
        f.seek(0)
        payload = f.read()
    file = write_zip(tmp_path / "tampered.ck", {**members, member: payload})
    exc = load_error(file)
    assert not marker.exists(), f"load_learner unpickled {member}"
    assert_clear_load_error(exc, file, member)


@pytest.mark.parametrize("missing", MEMBERS)
def test_missing_member(tmp_path, exported, missing):
    _, members, _ = exported
    file = write_zip(tmp_path / "incomplete.ck", {k: v for k, v in members.items() if k != missing})
    assert_clear_load_error(load_error(file), file, missing)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -22, -1])
def test_truncated_export(tmp_path, exported, keep):
    "A download or copy cut short: the first bytes only (an empty file, a local header, half, all but the end)."
    file, _, _ = exported
    data = file.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    cut = tmp_path / "cut.ck"
    cut.write_bytes(data[:n])
    assert_clear_load_error(load_error(cut), cut)


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b"\x89PNG\r\n\x1a\n" + bytes(100), b"",
                                     "pickle"])
def test_not_a_zip(tmp_path, no_code_runs, content):
    marker = tmp_path / "executed"
    if content == "pickle":
        content = pickle.dumps(Payload(marker))
    file = tmp_path / "export.ck"
    file.write_bytes(content)
    exc = load_error(file)
    assert not marker.exists()
    assert_clear_load_error(exc, file)


def test_a_torch_checkpoint_is_not_an_export(tmp_path, no_code_runs):
    "A common mix-up: `load_learner` on what `learn.save` wrote. Clear error, nothing unpickled."
    learn = make_learner(tmp_path)
    file = learn.save("stage")
    assert_clear_load_error(load_error(file), file)


def test_wrong_tensor_shapes(tmp_path, exported):
    "model.safetensors from a wider model: the error names the parameter and both shapes."
    _, members, _ = exported
    import safetensors.torch
    wide = {k: v for k, v in simple_mlp(3, 2, hidden=[9]).state_dict().items()}
    file = write_zip(tmp_path / "wide.ck", {**members, "model.safetensors": safetensors.torch.save(wide)})
    exc = load_error(file)
    assert isinstance(exc, RuntimeError), f"{type(exc).__name__}: {exc}"
    text = message(exc)
    assert "0.weight" in text and "[9, 3]" in text and "[8, 3]" in text, text
    assert_clear_load_error(exc, file, "0.weight")


@pytest.mark.parametrize("member, content, detail", [
    ("learner.json", '{"loss": {"name": "CrossEntropyLossFlat", "kwargs": {}}, "precision": "fp8"}', ("precision", "fp8")),
    ("learner.json", '{"loss": {"name": "os.system", "kwargs": {}}, "precision": "fp32"}', ("loss", "os.system")),
    ("learner.json", "{not json", "learner.json"),
    ("model.json", "[]", "model.json"),
    ("model.json", '{"builder": "coursekit.learner:simple_mlp", "kwargs": {"n_in": 3, "n_out": 2, "x": 1}}', "x"),
    ("model.safetensors", "not safetensors at all", "model.safetensors"),
])
def test_damaged_member_content(tmp_path, exported, member, content, detail):
    _, members, _ = exported
    file = write_zip(tmp_path / "damaged.ck", {**members, member: content})
    assert_clear_load_error(load_error(file), file, *([detail] if isinstance(detail, str) else detail))


@pytest.mark.parametrize("damage", ["not_a_zip", "truncated", "missing_member", "wrong_shapes", "refused_builder"])
def test_load_errors_name_the_file(tmp_path, exported, damage):
    """Whatever is wrong with an export, the error says which file (in its message or a note added with
    `add_note`): a notebook may load several exports, and the traceback of a zip error does not say."""
    file, members, _ = exported
    bad = tmp_path / "my_export.ck"
    if damage == "not_a_zip":
        bad.write_text("hello")
    elif damage == "truncated":
        bad.write_bytes(file.read_bytes()[:-22])
    elif damage == "missing_member":
        write_zip(bad, {k: v for k, v in members.items() if k != "data.json"})
    elif damage == "wrong_shapes":
        import safetensors.torch
        write_zip(bad, {**members, "model.safetensors": safetensors.torch.save(simple_mlp(3, 2, hidden=[9]).state_dict())})
    else:
        write_zip(bad, {**members, "model.json": json.dumps({"builder": "os:system", "kwargs": {}})})
    exc = load_error(bad)
    assert "my_export.ck" in message(exc), f"the error does not say which file is broken: {message(exc)!r}"


# === 3. Learner.load refuses pickled code =================================================

@pytest.mark.parametrize("kind", ["payload", "whole_model"])
def test_load_refuses_pickled_objects(tmp_path, no_code_runs, kind):
    """`weights_only=True` refuses anything but tensors: a payload that would run code, or a whole model
    saved with `torch.save(learn.model)`. Nothing runs, the weights stay, the error names the file."""
    learn = make_learner(tmp_path)
    quiet_fit(learn)
    before = weights(learn)
    marker = tmp_path / "executed"
    file = tmp_path / "models" / "bad.pth"
    file.parent.mkdir()
    _Audit.active = False  # writing the payload pickles it; only loading is watched
    torch.save({"model": Payload(marker)} if kind == "payload" else learn.model, file)
    _Audit.active = True
    with pytest.raises(pickle.UnpicklingError):
        learn.load("bad")
    assert not marker.exists(), "Learner.load unpickled code"
    assert_same_weights(weights(learn), before)


def test_load_refusal_names_the_file(tmp_path, no_code_runs):
    """`learn.load("bad")` reads `path/models/bad.pth`: when it refuses the file, the user should see which
    file (torch's own message names neither the file nor a way to fix it that `Learner.load` offers)."""
    learn = make_learner(tmp_path)
    file = tmp_path / "models" / "bad.pth"
    file.parent.mkdir()
    torch.save(learn.model, file)  # a whole model, as `torch.save(learn.model, ...)` writes it
    with pytest.raises(pickle.UnpicklingError) as info:
        learn.load("bad")
    assert "bad.pth" in message(info.value), f"the error does not say which file: {message(info.value)!r}"


def test_failed_load_leaves_the_model_unchanged(tmp_path):
    """A checkpoint of another model (here a 3-class head): the error names the mismatch, and the model
    keeps all of its weights (`load_state_dict` copies the matching tensors before it raises)."""
    other = Learner(make_dls(), simple_mlp(3, 3, hidden=[8]), path=tmp_path, cbs=[])
    other.save("three_classes", with_opt=False)
    learn = make_learner(tmp_path)
    quiet_fit(learn)
    before = weights(learn)
    with pytest.raises(RuntimeError, match="size mismatch"):
        learn.load("three_classes", with_opt=False)
    assert_same_weights(weights(learn), before)


# === 4. Ctrl-C during fit ==================================================================

class Snapshots(Callback):
    "Copies the weights after every optimizer step, and counts the steps (runs before the other callbacks)."
    order = -10
    def before_fit(self, learn): self.last, self.steps = weights(learn), 0
    def after_step(self, learn): self.last, self.steps = weights(learn), self.steps + 1


class CtrlC(Callback):
    """Raises KeyboardInterrupt at `event` of training batch number `at` (0-based, counted over the whole
    fit), or, for `before_validate`/`after_validate`, at the first validation after that batch."""
    order = 90
    def __init__(self, event: str, at: int):
        self.event, self.at, self.train_batches, self.bar_at_interrupt = event, at, -1, None

    def _check(self, learn, event: str):
        if event != self.event:
            return
        hit = self.train_batches >= self.at if event.endswith("validate") else learn.training and self.train_batches == self.at
        if hit:
            self.bar_at_interrupt = next((cb.bar for cb in learn.cbs if isinstance(cb, ProgressCallback)), None)
            raise KeyboardInterrupt()

    def before_batch(self, learn):
        if learn.training:
            self.train_batches += 1
        self._check(learn, "before_batch")
    def after_pred(self, learn): self._check(learn, "after_pred")
    def after_loss(self, learn): self._check(learn, "after_loss")
    def after_backward(self, learn): self._check(learn, "after_backward")
    def before_step(self, learn): self._check(learn, "before_step")
    def after_step(self, learn): self._check(learn, "after_step")
    def after_batch(self, learn): self._check(learn, "after_batch")
    def before_validate(self, learn): self._check(learn, "before_validate")
    def after_validate(self, learn): self._check(learn, "after_validate")


class Hooked(Callback):
    "Puts a forward hook on the model for the fit and removes it in `after_fit`, as a real callback would."
    def before_fit(self, learn): self.handle = learn.model.register_forward_hook(lambda m, i, o: None)
    def after_fit(self, learn):
        self.handle.remove()
        self.done = True


@pytest.mark.parametrize("event", ["before_batch", "after_pred", "after_loss", "after_backward", "before_step",
                                   "after_step", "after_batch", "before_validate", "after_validate"])
def test_ctrl_c_keeps_the_weights_reached(tmp_path, event, capsys):
    """Ctrl-C in the middle of the second epoch (training batch 6 of 4 per epoch, or the first
    validation after it): the interrupt reaches the caller; the weights are those of the last
    completed step; the optimizer took exactly that many steps; every callback's teardown ran; the
    progress bar is closed; and the learner can be trained and used again."""
    learn = make_learner(tmp_path)
    for cb in [cb for cb in learn.cbs if isinstance(cb, ProgressCallback)]:
        learn.remove_cb(cb)
    progress = learn.add_cb(ProgressCallback(notebook=True))  # the notebook display: one bar per fit
    snaps, ctrl_c, hooked = Snapshots(), CtrlC(event, at=5), Hooked()
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, cbs=[snaps, ctrl_c, hooked])

    expected_steps = 6 if event in ("after_step", "after_batch") else 5
    if event in ("before_validate", "after_validate"):
        expected_steps = 8  # the whole second epoch
    assert snaps.steps == expected_steps, (event, snaps.steps)
    assert_same_weights(weights(learn), snaps.last)
    opt_steps = {int(s["step"]) for s in learn.opt.state.values()}
    assert opt_steps == {expected_steps}, f"optimizer state says {opt_steps} steps, the weights {expected_steps}"
    assert all(p.grad is None for p in learn.model.parameters()), "gradients of the interrupted batch are left"
    assert hooked.done and not learn.model._forward_hooks, "a callback's teardown did not run"
    assert not learn.model.training and not learn.training
    assert not any(cb in learn.cbs for cb in (snaps, ctrl_c, hooked)), "the fit's own callbacks stayed on"
    if event != "after_validate":  # (after_validate: the bar is closed before the interrupt)
        assert ctrl_c.bar_at_interrupt is not None, "the test should interrupt while a progress bar is open"
        assert ctrl_c.bar_at_interrupt.disable, "the progress bar was left open"
    assert progress.bar is None, "the progress callback still holds a bar"
    assert not progress.active

    learn.fit(1)  # the learner goes on from where it was
    assert len(learn.recorder.values) == 1 and not learn.model._forward_hooks
    assert int(next(iter(learn.opt.state.values()))["step"]) == expected_steps + 4
    label, idx, probs = learn.predict(INPUTS[0])
    assert label in ("neg", "pos") and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_ctrl_c_in_fit_one_cycle_removes_the_scheduler(tmp_path):
    "After an interrupted one-cycle fit, a plain `fit(lr=...)` trains at that lr, not at the schedule's."
    learn = make_learner(tmp_path)
    with pytest.raises(KeyboardInterrupt), learn.no_bar():
        learn.fit_one_cycle(2, 1e-2, cbs=[CtrlC("after_step", 2)])
    assert not any(isinstance(cb, (ParamScheduler, CtrlC)) for cb in learn.cbs)
    quiet_fit(learn, lr=3e-4)
    assert [g["lr"] for g in learn.opt.param_groups] == [3e-4]


def test_ctrl_c_in_lr_find_restores_the_model(tmp_path):
    "lr_find promises to leave the model unchanged: also when it is interrupted; the progress bar comes back."
    learn = make_learner(tmp_path)
    quiet_fit(learn)
    before, opt_before = weights(learn), {int(s["step"]) for s in learn.opt.state.values()}
    ctrl_c = learn.add_cb(CtrlC("after_step", 2))  # lr_find takes no callbacks: add one to the learner
    with pytest.raises(KeyboardInterrupt):
        learn.lr_find(num_it=20, show_plot=False)
    learn.remove_cb(ctrl_c)
    assert ctrl_c.train_batches == 2, "the interrupt should come during lr_find's third batch"
    assert_same_weights(weights(learn), before)
    assert {int(s["step"]) for s in learn.opt.state.values()} == opt_before, "the optimizer state was not restored"
    assert sum(isinstance(c, ProgressCallback) for c in learn.cbs) == 1, "lr_find did not put the progress bar back"
    assert not any(isinstance(c, LRFinder) for c in learn.cbs)


# === 5. export -> load_learner in a fresh process ==========================================

def test_round_trip_in_a_fresh_process(tmp_path, exported):
    """A new interpreter that imports only `load_learner` (so the builders' modules are imported by the
    loader itself) gives bit-identical probabilities and the same labels."""
    file, _, (probs, labels) = exported
    out = tmp_path / "preds.pt"
    script = textwrap.dedent(f"""
        import torch
        from coursekit.learner import load_learner
        learn = load_learner({str(file)!r}, device="cpu")
        x = torch.tensor({INPUTS.tolist()!r})
        probs, _ = learn.get_preds(dl=learn.dls.test_dl(list(x)))
        torch.save({{"probs": probs, "labels": [learn.predict(i)[0] for i in x]}}, {str(out)!r})
    """)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["labels"] == labels
    assert torch.equal(got["probs"], probs), (got["probs"] - probs).abs().max()
    assert len(set(labels)) == 2, "the inputs should exercise both classes"


# === 6. fuzzing ==========================================================================

@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corrupted_export_bytes(exported, no_code_runs, data):
    """Random byte changes (and sometimes a cut) anywhere in a valid export: `load_learner` either gives
    a learner that predicts exactly as the original, or one of the documented errors with a message."""
    file, _, (probs, labels) = exported
    raw = bytearray(file.read_bytes())
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=6))
    for pos, value in edits:
        raw[pos] = value
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    with tempfile.TemporaryDirectory() as d:
        mutated = Path(d) / "mutated.ck"
        mutated.write_bytes(bytes(raw))
        try:
            learn = load_learner(mutated, device="cpu")
        except BaseException as e:  # noqa: BLE001
            assert isinstance(e, LOAD_ERRORS), f"{type(e).__module__}.{type(e).__qualname__}: {e!r}"
            assert str(e).strip(), f"{type(e).__name__} without a message"
            return
        got_probs, got_labels = predictions(learn)
        assert got_labels == labels and torch.equal(got_probs, probs)


BUILDERS = ["coursekit.learner:simple_mlp", "coursekit.data.core:DataLoaders.for_inference",
            "coursekit.data.core:CategoryBlock", "coursekit.data.core:TransformBlock", "coursekit.data.core:RegressionBlock",
            "os:system", "builtins:exec", "coursekit.core:build_exportable", "coursekit.learner:Learner", ""]
KEYS = ["builder", "kwargs", "n_in", "n_out", "hidden", "bn", "blocks", "vocab", "encoded", "item_tfms", "batch_tfms",
        "n_inp", "bs", "loss", "name", "precision", "axis", "command"]
small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 12) | st.sampled_from(BUILDERS + ["fp32", "fp16", "neg", "pos"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=10)


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_export_specs(exported, no_code_runs, data):
    """A well-formed zip whose JSON is replaced (whole, or one value deep inside) by small random JSON
    built from real and forbidden builder names: a learner that predicts, or a documented error."""
    _, members, _ = exported
    member = data.draw(st.sampled_from(["model.json", "data.json", "learner.json"]))
    spec = json.loads(members[member])
    if data.draw(st.booleans()):
        spec = data.draw(small_json)
    else:  # change one value somewhere inside the real spec
        node = spec
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = data.draw(st.sampled_from(keys))
            if isinstance(node[key], (dict, list)) and node[key] and data.draw(st.booleans()):
                node = node[key]
                continue
            node[key] = data.draw(small_json)
            break
    with tempfile.TemporaryDirectory() as d:
        file = write_zip(Path(d) / "fuzzed.ck", {**members, member: json.dumps(spec)})
        try:
            learn = load_learner(file, device="cpu")
            label, _, probs = learn.predict(INPUTS[0])
        except BaseException as e:  # noqa: BLE001
            assert isinstance(e, LOAD_ERRORS), f"{member}={json.dumps(spec)}: {type(e).__name__}: {e!r}"
            assert str(e).strip(), f"{type(e).__name__} without a message"
            return
        assert isinstance(label, str) and probs.shape == (2,)
