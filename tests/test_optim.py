import torch

from iet_core.optim import AdamState, FlatParams, adam_step, clip_grad_norm_, ema_update_, weighted_average


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _grads(model, seed):
    torch.manual_seed(seed)
    x = torch.randn(16, 4)
    return model(x).square().mean()


def test_flat_adam_matches_torch_adam_and_adamw():
    for decoupled, cls in ((False, torch.optim.Adam), (True, torch.optim.AdamW)):
        ours, theirs = _model(), _model()
        flat = FlatParams(ours)
        state = AdamState.zeros_like(flat.data)
        optimizer = cls(theirs.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(5):
            flat.zero_grad()
            _grads(ours, step).backward()
            assert flat.grad.abs().sum() > 0  # gradients land in the flat buffer
            adam_step(flat.data, flat.grad, state, 1e-2, None, weight_decay=0.1, decoupled=decoupled)
            optimizer.zero_grad()
            _grads(theirs, step).backward()
            optimizer.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gated_step_changes_nothing():
    model = _model()
    flat = FlatParams(model)
    state = AdamState.zeros_like(flat.data)
    _grads(model, 0).backward()
    adam_step(flat.data, flat.grad, state, 1e-2, torch.tensor(True))
    before = [flat.data.clone(), state.exp_avg.clone(), state.exp_avg_sq.clone(), state.step.clone()]
    ema = flat.data.clone() + 1
    ema_before = ema.clone()
    flat.zero_grad()
    _grads(model, 1).backward()
    adam_step(flat.data, flat.grad, state, 1e-2, torch.tensor(False))
    ema_update_(ema, flat.data, 0.9, torch.tensor(False))
    after = [flat.data, state.exp_avg, state.exp_avg_sq, state.step]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(ema, ema_before)


def test_clip_matches_torch():
    a, b = _model(), _model()
    flat = FlatParams(a)
    _grads(a, 0).backward()
    _grads(b, 0).backward()
    norm = clip_grad_norm_(flat.grad, 0.01)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.01)
    torch.testing.assert_close(norm.squeeze(), ref)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_weighted_average_with_unequal_shards_by_hand():
    # shards of 3 and 1 images: weights 3/4 and 1/4
    average = weighted_average([torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])], [3, 1])
    assert average.tolist() == [2.0, 3.0]
    average = weighted_average([torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([20.0])], [1, 2, 5])
    assert abs(average.item() - (0 * 1 + 10 * 2 + 20 * 5) / 8) < 1e-6
