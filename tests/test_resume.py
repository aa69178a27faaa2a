"""Resuming an interrupted fit (issue 11): a fit killed by the operating system and resumed in a new process ends
exactly where the uninterrupted fit ends.

The training here draws from every random-number generator a real fit may use: the loader shuffles (torch), the
model has dropout (torch), an item transform scales each item by a random factor (Python's `random`) and a batch
transform adds noise of a random strength (numpy and torch). Each run is a fresh interpreter (`worker` below, run
with `python -c`), so nothing is shared between the interrupted and the resumed process but the checkpoint file.
"""
import io
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from coursekit.callbacks import SaveModelCallback
from coursekit.core import set_seed
from coursekit.data.core import DataLoader, DataLoaders, Transform
from coursekit.learner import Callback, Learner
from coursekit.persist import read_training_checkpoint

ROOT = Path(__file__).resolve().parent.parent
N_EPOCH = 4
LR_MAX = 1e-2
TOLERANCE = 1e-6


# --- the fit: data with random augmentation, a model with dropout -------------------------------------------------

class ScaleItem(Transform):
    "Augmentation on each item: scale the input by a random factor drawn from Python's `random`."
    train_only = True

    def __call__(self, sample, kinds, training):
        x, y = sample
        return x * random.uniform(0.8, 1.2), y


class NoisyBatch(Transform):
    "Augmentation on each batch: add noise whose strength numpy draws and whose values torch draws."
    train_only = True

    def __call__(self, batch, kinds, training):
        x, y = batch
        return x + float(np.random.uniform(0.0, 0.2)) * torch.randn_like(x), y


def make_dls() -> DataLoaders:
    "160 points in 4-d, three classes by which of x0, x1, x2 is largest; 128 to train on (shuffled), 32 to validate."
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(160, 4, generator=generator)
    y = x[:, :3].argmax(1)
    samples = list(zip(x, y))
    train = DataLoader(samples[:128], bs=16, shuffle=True, drop_last=True, device="cpu",
                       item_tfms=[ScaleItem()], batch_tfms=[NoisyBatch()])
    valid = DataLoader(samples[128:], bs=16, device="cpu")
    return DataLoaders(train, valid)


def make_learner(folder, seed: int, hidden: int = 32) -> Learner:
    "A fresh learner; `seed` sets its random initial weights (a resumed learner gets other ones on purpose)."
    set_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 3))
    return Learner(make_dls(), model, loss_func=nn.CrossEntropyLoss(), path=folder, cbs=[])


def always_better(value, best) -> bool:
    "A `comp` for SaveModelCallback that counts every epoch as an improvement: every epoch rewrites one file."
    return True


def savers(kind: str) -> list:
    "`every_epoch`: a file per epoch; `same_file`: one file, rewritten after every epoch."
    if kind == "every_epoch":
        return [SaveModelCallback(every_epoch=True, with_opt=True)]
    return [SaveModelCallback(comp=always_better, with_opt=True)]


class KillAfterEpoch(Callback):
    "SIGKILL this process at the end of epoch `epoch`, after the checkpoint callbacks (order 70) wrote their files."
    order = 80

    def __init__(self, epoch: int):
        self.epoch = epoch

    def after_epoch(self, learn):
        if learn.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_during_save(save_number: int):
    "Make the `save_number`th `torch.save` write half of its bytes, then SIGKILL the process: a kill mid-write."
    real_save = torch.save
    calls = []

    def half_save_then_die(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < save_number:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = half_save_then_die


class Scramble(Callback):
    "Reseed one generator at the start of the first epoch: what a resume that does not restore that generator does."
    order = -10

    def __init__(self, generator: str):
        self.generator = generator
        self.done = False

    def before_epoch(self, learn):
        if self.done:
            return
        self.done = True
        if self.generator == "torch":
            torch.manual_seed(1234)
        elif self.generator == "numpy":
            np.random.seed(1234)
        else:
            random.seed(1234)


def worker(folder: str, seed: int, saver: str, resume: str = "", kill_after_epoch: int = -1, kill_at_save: int = -1,
           scramble: str = ""):
    "One run in its own process: fit, maybe killed or resumed; writes the final weights and the recorder to `folder`."
    torch.set_num_threads(1)
    learn = make_learner(folder, seed)
    cbs = savers(saver)
    if kill_after_epoch >= 0:
        cbs.append(KillAfterEpoch(kill_after_epoch))
    if kill_at_save > 0:
        kill_during_save(kill_at_save)
    if scramble:
        cbs.append(Scramble(scramble))
    with learn.no_bar():
        learn.fit_one_cycle(N_EPOCH, LR_MAX, cbs=cbs, resume=resume or None)
    safetensors.torch.save_file(learn.model.state_dict(), str(Path(folder) / "final.safetensors"))
    history = {"losses": learn.recorder.losses, "values": learn.recorder.values, "lrs": learn.recorder.lrs}
    (Path(folder) / "history.json").write_text(json.dumps(history))


def run_worker(folder: Path, **kwargs) -> subprocess.CompletedProcess:
    "Run `worker(folder, **kwargs)` in a new interpreter, on one thread."
    call = f"import test_resume; test_resume.worker({str(folder)!r}, **{kwargs!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", call], env=env, capture_output=True, text=True, timeout=300)


def finished(folder: Path) -> tuple:
    "The final weights and the history a worker wrote."
    weights = safetensors.torch.load_file(str(folder / "final.safetensors"))
    return weights, json.loads((folder / "history.json").read_text())


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def assert_same_fit(result: tuple, reference: tuple):
    "Same weights within 1e-6, and the same recorded losses, learning rates and epoch rows."
    weights, history = result
    reference_weights, reference_history = reference
    assert largest_difference(weights, reference_weights) <= TOLERANCE
    for key in ("losses", "lrs", "values"):
        assert np.allclose(history[key], reference_history[key], rtol=0, atol=TOLERANCE, equal_nan=True), key
    assert len(history["values"]) == N_EPOCH


def assert_killed(process: subprocess.CompletedProcess):
    assert process.returncode == -signal.SIGKILL, (process.returncode, process.stderr[-3000:])


def assert_ran(process: subprocess.CompletedProcess):
    assert process.returncode == 0, process.stderr[-3000:]


# --- the contract --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple:
    "The uninterrupted 4-epoch one-cycle fit, with a checkpoint after every epoch."
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert_ran(run_worker(folder, seed=0, saver="every_epoch"))
    return finished(folder)


@pytest.fixture(scope="module")
def killed_after_epoch_2(tmp_path_factory) -> Path:
    "The same fit, SIGKILLed once the checkpoint of its second epoch (`model_1.pth`) is written."
    folder = tmp_path_factory.mktemp("killed")
    assert_killed(run_worker(folder, seed=0, saver="every_epoch", kill_after_epoch=1))
    assert sorted(path.name for path in (folder / "models").iterdir()) == ["model_0.pth", "model_1.pth"]
    assert not (folder / "final.safetensors").exists()
    return folder


def test_a_killed_fit_resumed_in_a_new_process_ends_as_if_never_interrupted(reference, killed_after_epoch_2):
    folder = killed_after_epoch_2
    checkpoint = folder / "models" / "model_1.pth"
    assert read_training_checkpoint(checkpoint, "cpu")["training"]["epoch"] == 2
    assert_ran(run_worker(folder, seed=1, saver="every_epoch", resume=str(checkpoint)))  # other initial weights
    assert_same_fit(finished(folder), reference)
    assert sorted(path.name for path in (folder / "models").iterdir()) == [f"model_{epoch}.pth" for epoch in range(4)]


@pytest.mark.parametrize("generator", ["torch", "numpy", "python"])
def test_without_restoring_each_random_generator_the_resumed_fit_diverges(reference, killed_after_epoch_2, tmp_path,
                                                                         generator):
    """Why the checkpoint holds the random states: a resume that loads weights, optimizer, schedule and history but
    leaves one generator where it is (fastai's `start_epoch` restores none of them) follows another path."""
    checkpoint = killed_after_epoch_2 / "models" / "model_1.pth"
    threads = torch.get_num_threads()
    try:  # in this process: a divergence needs no bit-for-bit match with the workers
        worker(str(tmp_path), seed=1, saver="every_epoch", resume=str(checkpoint), scramble=generator)
    finally:
        torch.set_num_threads(threads)
    weights, history = finished(tmp_path)
    reference_weights, reference_history = reference
    assert largest_difference(weights, reference_weights) > 1e-3
    assert history["losses"][:16] == pytest.approx(reference_history["losses"][:16], abs=TOLERANCE)  # restored
    assert not np.allclose(history["losses"][16:], reference_history["losses"][16:], atol=1e-4)


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(reference, tmp_path):
    """One file rewritten after every epoch; the process is killed half way through writing it the third time.
    The file still holds the second epoch's checkpoint, whole: it loads, and resuming from it ends the fit
    exactly; the temporary file the killed write left is cleared by the next write."""
    assert_killed(run_worker(tmp_path, seed=0, saver="same_file", kill_at_save=3))
    checkpoint = tmp_path / "models" / "model.pth"
    leftovers = [path.name for path in (tmp_path / "models").iterdir() if path != checkpoint]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp"), leftovers  # the half-written temporary file
    assert read_training_checkpoint(checkpoint, "cpu")["training"]["epoch"] == 2
    learn = make_learner(tmp_path, seed=3)
    learn.load("model")  # also an ordinary checkpoint
    assert_ran(run_worker(tmp_path, seed=1, saver="same_file", resume=str(checkpoint)))
    assert_same_fit(finished(tmp_path), reference)
    assert [path.name for path in (tmp_path / "models").iterdir()] == ["model.pth"]


# --- refusals ------------------------------------------------------------------------------------------------------

def test_resume_refuses_another_fit_before_changing_anything(killed_after_epoch_2, tmp_path):
    checkpoint = killed_after_epoch_2 / "models" / "model_1.pth"
    learn = make_learner(tmp_path, seed=5)
    before = {name: tensor.clone() for name, tensor in learn.model.state_dict().items()}
    cases = [(lambda: learn.fit_one_cycle(N_EPOCH + 1, LR_MAX, resume=checkpoint), "n_epoch 4 in the checkpoint, 5 now"),
             (lambda: learn.fit_one_cycle(N_EPOCH, 3 * LR_MAX, resume=checkpoint), "schedules"),
             (lambda: learn.fit(N_EPOCH, resume=checkpoint), "schedules"),
             (lambda: learn.fit_one_cycle(N_EPOCH, LR_MAX, resume=tmp_path / "nothing.pth"), "No checkpoint to resume")]
    for resume, message in cases:
        with learn.no_bar(), pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
            resume()
        for name, tensor in learn.model.state_dict().items():
            assert torch.equal(tensor, before[name]), (message, name)
    wider = make_learner(tmp_path, seed=5, hidden=64)
    with wider.no_bar(), pytest.raises(RuntimeError, match=r"size mismatch for 0.weight: \[32, 4\] in the file"):
        wider.fit_one_cycle(N_EPOCH, LR_MAX, resume=checkpoint)


def test_resume_needs_the_optimizer_state(tmp_path):
    learn = make_learner(tmp_path, seed=0)
    with learn.no_bar():
        learn.fit_one_cycle(2, LR_MAX, cbs=[SaveModelCallback(every_epoch=True)])  # fastai's default: with_opt=False
        with pytest.raises(ValueError, match=r"SaveModelCallback\(with_opt=True\)"):
            learn.fit_one_cycle(2, LR_MAX, resume=tmp_path / "models" / "model_0.pth")
        learn.save("weights")
        with pytest.raises(ValueError, match="holds weights only"):
            learn.fit_one_cycle(2, LR_MAX, resume=tmp_path / "models" / "weights.pth")


# --- what the data loader draws -------------------------------------------------------------------------------------

def test_an_epoch_draws_the_same_random_numbers_whether_the_cache_is_warm_or_not():
    """A resumed fit starts with a cold cache of prepared items; the fit it continues had a warm one. Preparing the
    items (a torch DataLoader over them) must not draw from torch's global generator, or the resumed fit's data
    order, dropout and augmentations would all shift."""
    after_epoch = []
    dl = make_dls().train
    for epoch in range(2):
        torch.manual_seed(0)
        list(dl)
        after_epoch.append(torch.rand(1).item())
    assert dl.is_cached
    assert after_epoch[0] == after_epoch[1]


# --- fine_tune: a checkpoint of either stage continues at that stage ------------------------------------------------

FREEZE_EPOCHS, EPOCHS = 2, 3


def body_and_head(model: nn.Sequential) -> list:
    "Two parameter groups, so that freezing the body changes what trains: the first layer, and the last."
    return [list(model[0].parameters()), list(model[3].parameters())]


class Interrupted(Exception):
    "What `InterruptAfter` raises: stands for a crash or Ctrl-C at the end of an epoch."


class InterruptAfter(Callback):
    "Raise `Interrupted` at the end of the `n`th epoch of a `fine_tune`, counted over both stages, after the checkpoint."
    order = 80

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def after_epoch(self, learn):
        self.seen += 1
        if self.seen == self.n:
            raise Interrupted()


def fine_tune_learner(folder, seed: int) -> Learner:
    "A learner with a body and a head (other initial weights for another `seed`)."
    set_seed(seed)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
    return Learner(make_dls(), model, loss_func=nn.CrossEntropyLoss(), path=folder, cbs=[], splitter=body_and_head)


def fine_tuned(folder, seed: int, resume=None, interrupt_after: int = 0) -> dict:
    "Weights after `fine_tune(EPOCHS, freeze_epochs=FREEZE_EPOCHS)`, with a checkpoint per epoch."
    learn = fine_tune_learner(folder, seed)
    cbs = [SaveModelCallback(every_epoch=True, with_opt=True, fname="tune")]
    if interrupt_after:
        cbs.append(InterruptAfter(interrupt_after))
    with learn.no_bar():
        learn.fine_tune(EPOCHS, 1e-2, freeze_epochs=FREEZE_EPOCHS, cbs=cbs, resume=resume)
    return {name: tensor.clone() for name, tensor in learn.model.state_dict().items()}


@pytest.fixture(scope="module")
def fine_tune_reference(tmp_path_factory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fine_tuned(tmp_path_factory.mktemp("fine_tune"), seed=0)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("stage,interrupt_after,checkpoint", [("frozen", 1, "tune_0.pth"), ("unfrozen", 4, "tune_1.pth")])
def test_fine_tune_resumes_at_the_stage_its_checkpoint_was_written_in(fine_tune_reference, tmp_path, stage,
                                                                      interrupt_after, checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(Interrupted):
            fine_tuned(tmp_path, seed=0, interrupt_after=interrupt_after)
        resumed = fine_tuned(tmp_path, seed=1, resume=tmp_path / "models" / checkpoint)   # other initial weights
    finally:
        torch.set_num_threads(threads)
    assert largest_difference(resumed, fine_tune_reference) <= TOLERANCE, stage


def test_fine_tune_refuses_a_checkpoint_of_another_fit_naming_fit_one_cycle(tmp_path):
    learn = fine_tune_learner(tmp_path, seed=0)
    with learn.no_bar():
        learn.fit_one_cycle(4, 1e-2, cbs=[SaveModelCallback(every_epoch=True, with_opt=True)])
    before = {name: tensor.clone() for name, tensor in learn.model.state_dict().items()}
    with learn.no_bar(), pytest.raises(ValueError, match=r"written by neither stage of this fine_tune.*fit_one_cycle"):
        learn.fine_tune(EPOCHS, 1e-2, freeze_epochs=FREEZE_EPOCHS, resume=tmp_path / "models" / "model_1.pth")
    for name, tensor in learn.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(param.requires_grad for param in learn.model.parameters())   # not left frozen either
