"""The model benchmark on tiny configurations: converted models give the stock model's
outputs and gradients within float32 tolerance, the GroupNorm share is a real share, and
the table prints a row per model, pass and mode."""
import pytest
import torch

pytest.importorskip("diffusers")

from groupnorm import GroupNorm, convert                  # noqa: E402
from groupnorm.bench import models                        # noqa: E402

CASES = {c.name.split()[1]: c for c in models.model_cases("cpu", tiny=True)}   # "VAE", "SD"


def test_variants_share_the_stock_weights_and_swap_every_norm():
    torch.manual_seed(0)
    stock = models.sd_vae(tiny=True)
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in stock.modules())
    out = models.variants(stock)
    assert out["stock"] is stock
    for name in ("convert", "convert+fuse"):
        ours = [m for m in out[name].modules() if isinstance(m, GroupNorm)]
        assert len(ours) == n_norms > 0
        for a, b in zip(stock.parameters(), out[name].parameters()):
            assert a is not b and torch.equal(a, b)


@pytest.mark.parametrize("key,train", [("VAE", False), ("SD", False), ("SD", True)])
def test_converted_models_match_the_stock_model(key, train):
    row = models.measure(CASES[key], "cpu", torch.float32, train, "eager", budget_s=0.01, rounds=1)
    assert row.error is None
    assert set(row.ms) == set(models.VARIANTS) and all(t > 0 for t in row.ms.values())
    assert set(row.diff) == {"convert", "convert+fuse"}
    for name, diff in row.diff.items():
        assert diff < 1e-4, (name, diff)      # outputs (and, training, every gradient) vs stock
    for name, share in row.share.items():
        assert 0.0 < share < 1.0, (name, share)
    line = models.format_row(row)
    assert line.startswith(f"| {CASES[key].name} | {'training step' if train else 'forward'} | eager | ")


def test_compare_catches_a_wrong_model():
    case = CASES["VAE"]
    torch.manual_seed(0)
    out = models.variants(case.make().eval())
    with torch.no_grad():
        next(iter(out["convert"].decoder.parameters())).add_(0.01)
    diffs = models.compare(case, out, case.inputs(torch.device("cpu"), torch.float32), train=False)
    assert diffs["convert"] > 1e-3 and diffs["convert+fuse"] < 1e-4


@pytest.fixture
def one_thread():
    # Shares are ratios of times: with two threads on a shared 2-core machine a parallel
    # region can wait a whole scheduler slice, which says nothing about the norm.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_share_of_a_model_that_is_mostly_group_norms(one_thread):
    class Norms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norms = torch.nn.Sequential(*(torch.nn.GroupNorm(4, 32) for _ in range(6)))

        def forward(self, x):
            return self.norms(x)

    case = models.ModelCase("norms", Norms, lambda dev, dt: (torch.randn(2, 32, 64, 64),), lambda m, x: m(x), True)
    for model in (Norms(), convert(Norms())):
        forward, backward = models.shares(case, model, case.inputs(None, None), train=False)
        assert forward > 0.7 and backward == 0.0
        forward, backward = models.shares(case, model, case.inputs(None, None), train=True)
        assert forward > 0.02 and backward > 0.05 and forward + backward < 1.0   # the loss takes the rest
        assert models.groupnorm_share(case, model, case.inputs(None, None), train=False) > 0.7


@pytest.mark.slow
def test_tiny_models_under_torch_compile_match_the_stock_model():
    for case in CASES.values():
        row = models.measure(case, "cpu", torch.float32, case.train, "compile", budget_s=0.01, rounds=1)
        assert row.error is None and row.share == {}
        assert all(diff < 1e-4 for diff in row.diff.values()), row.diff
