"""The AWD-LSTM's weight-dropped LSTMs call the LSTM kernel directly (the cuDNN path on a GPU): the same numbers
as the `functional_call` route they replace, without going through `nn.LSTM.forward`."""
import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call

from coursekit.text.models import WeightDropout, awd_lstm_small_lm_config, get_language_model

VOCAB = 50


def functional_call_forward(self, x, hidden=None):
    "WeightDropout.forward as it was: nn.LSTM run through functional_call with the dropped matrix."
    raw = getattr(self, f"{self.layer_name}_raw")
    weights = {self.layer_name: F.dropout(raw, self.weight_p, training=self.training)}
    args = (x,) if hidden is None else (x, hidden)
    return functional_call(self.module, weights, args)


def train_steps(model, seed: int, steps: int = 3) -> list:
    "Losses of `steps` SGD steps of the language model on fixed random tokens, dropout drawn from `seed`."
    tokens = torch.randint(0, VOCAB, (steps, 4, 9), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for batch in tokens:
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses


def test_language_model_trains_exactly_as_through_functional_call(monkeypatch):
    torch.manual_seed(1)
    model = get_language_model(VOCAB, awd_lstm_small_lm_config)
    reference = copy.deepcopy(model)
    losses = train_steps(model, seed=7)
    monkeypatch.setattr(WeightDropout, "forward", functional_call_forward)
    reference_losses = train_steps(reference, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(losses, reference_losses)), (losses, reference_losses)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_the_kernel_is_called_without_nn_lstm_forward():
    "nn.LSTM.forward re-flattens its parameters in place on a GPU when a weight is swapped: it must not run."
    wd = WeightDropout(torch.nn.LSTM(4, 6, batch_first=True), 0.5)
    calls = []
    wd.module.register_forward_pre_hook(lambda module, args: calls.append(module))
    out, (h, c) = wd(torch.randn(2, 3, 4))
    assert calls == []
    assert out.shape == (2, 3, 6) and h.shape == c.shape == (1, 2, 6)


def test_the_cudnn_branch_hands_the_kernel_views_into_one_buffer(monkeypatch):
    "The GPU branch, run on the CPU with a made-up layout (gaps included): same numbers, weights viewed in one buffer."
    import coursekit.text.models as models

    wd = WeightDropout(torch.nn.LSTM(4, 6, batch_first=True), 0.5).train()
    sizes = [24 * 4, 24 * 6, 24, 24]
    offsets = (8, 8 + sizes[0] + 3, 8 + sizes[0] + 3 + sizes[1], 8 + sizes[0] + 3 + sizes[1] + sizes[2] + 5)
    total = offsets[-1] + sizes[-1] + 2
    asked = []

    def made_up_layout(module, weights):
        asked.append([tuple(w.shape) for w in weights])
        return offsets, total

    seen = []
    real_lstm = torch._VF.lstm

    def recording_lstm(x, hidden, weights, *args):
        seen.append(weights)
        return real_lstm(x, hidden, weights, *args)

    x = torch.randn(2, 3, 4)
    torch.manual_seed(5)
    reference, _ = wd(x)
    reference.sum().backward()
    reference_grads = [p.grad.clone() for p in wd.parameters()]
    wd.zero_grad()
    monkeypatch.setattr(models, "_uses_cudnn", lambda x, weights: True)
    monkeypatch.setattr(models, "cudnn_weight_layout", made_up_layout)
    monkeypatch.setattr(torch._VF, "lstm", recording_lstm)
    for _ in range(2):
        torch.manual_seed(5)
        out, _ = wd(x)
    out.sum().backward()
    assert torch.equal(out, reference)
    assert all(torch.equal(g, p.grad) for g, p in zip(reference_grads, wd.parameters()))
    assert asked == [[(24, 4), (24, 6), (24,), (24,)]]                                          # asked once, then kept
    base = seen[-1][0].data_ptr() - offsets[0] * 4
    assert [w.data_ptr() - base for w in seen[-1]] == [o * 4 for o in offsets]
    assert seen[-1][0].untyped_storage().nbytes() == total * 4
