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
