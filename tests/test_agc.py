import torch

from iet_core import agc
from iet_core.config import TAAConfig


def test_vectorised_bank_equals_sequential_with_repeated_timesteps():
    generator = torch.Generator().manual_seed(0)
    for timesteps in (torch.tensor([3, 3, 3, 1, 3, 0, 1]), torch.full((9,), 5), torch.randint(0, 20, (200,), generator=generator)):
        bank = torch.rand(20, generator=generator, dtype=torch.float64)
        loss = torch.rand(len(timesteps), generator=generator, dtype=torch.float64)
        for decay in (0.0, 0.5, 0.8, 0.99):
            fast = agc.update_bank(bank, timesteps, loss, decay)
            slow = agc.update_bank_sequential(bank, timesteps, loss, decay)
            torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-15)
    # float32 as in training: equal to rounding
    bank32, loss32 = bank.float(), torch.rand(200, generator=generator)
    torch.testing.assert_close(agc.update_bank(bank32, timesteps, loss32, 0.8),
                               agc.update_bank_sequential(bank32, timesteps, loss32, 0.8), rtol=1e-5, atol=1e-7)


def test_untouched_timesteps_keep_their_bank():
    bank = torch.arange(10, dtype=torch.float64)
    new = agc.update_bank(bank, torch.tensor([2, 2]), torch.tensor([1.0, 1.0], dtype=torch.float64), 0.8)
    assert torch.equal(new[[0, 1, 3, 4, 5, 6, 7, 8, 9]], bank[[0, 1, 3, 4, 5, 6, 7, 8, 9]])
    assert abs(new[2].item() - (0.8 * (0.8 * 2 + 0.2) + 0.2)) < 1e-12


def test_keep_mask_is_the_reference_rule():
    # reference: keep when loss * mem_ratio >= bank[t], mem_ratio = 1 / lambda
    bank = torch.tensor([0.0, 1.0, 2.0, 4.0])
    t = torch.tensor([0, 1, 2, 3, 3])
    loss = torch.tensor([0.01, 0.49, 1.0, 2.0, 1.99])
    keep = agc.keep_mask(loss, bank, t, 0.5)
    assert keep.tolist() == [True, False, True, True, False]
    assert keep.tolist() == (loss * 2.0 >= bank[t]).tolist()
    assert torch.isinf(agc.loss_ratio(loss, bank, t)[0])


def test_taa_strength_and_identity_at_zero_strength():
    config = TAAConfig(band=0.5)
    ratio = torch.tensor([0.2, 0.5, 0.75, 1.0, 2.0, float("nan")])
    strength = agc.taa_strength(ratio, 0.5, config)
    assert strength.tolist() == [1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    out = agc.augment(x, strength, config)
    assert torch.equal(out[3:], x[3:])
    assert not torch.equal(out[:2], x[:2])
    assert out.min() >= -1 and out.max() <= 1
