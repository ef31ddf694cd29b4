"""lit_kt.models.linear: the oneDNN linear against a float64 reference, and where it steps aside for F.linear."""

import pytest
import torch
import torch.nn.functional as F

import lit_kt.models.linear as linear_module
from lit_kt.models.linear import FastLinear, fast_linear

needs_onednn = pytest.mark.skipif(not linear_module._AVAILABLE, reason="this PyTorch has no oneDNN linear op")


def _reference(x, weight, bias, grad_out):
    """Value and gradients in float64 by the textbook formula: y = x W^T + b."""
    x, weight = x.double().requires_grad_(), weight.double().requires_grad_()
    bias = None if bias is None else bias.double().requires_grad_()
    y = x @ weight.t() + (0 if bias is None else bias)
    y.backward(grad_out.double())
    return y, x.grad, weight.grad, None if bias is None else bias.grad


@needs_onednn
@pytest.mark.parametrize("shape", [(37, 24), (3, 11, 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fast_linear_matches_float64_in_value_and_gradients(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    weight = torch.randn(40, 24, generator=g, requires_grad=True)
    bias = torch.randn(40, generator=g, requires_grad=True) if with_bias else None
    grad_out = torch.randn(*shape[:-1], 40, generator=g)
    y = fast_linear(x, weight, bias)
    assert type(y.grad_fn).__name__ == "OneDNNLinearBackward"  # the oneDNN path really ran
    y.backward(grad_out)
    ref = _reference(x.detach(), weight.detach(), None if bias is None else bias.detach(), grad_out)
    got = (y, x.grad, weight.grad, None if bias is None else bias.grad)
    for a, b in zip(got, ref):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_fast_linear_takes_strided_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 30, generator=g).t().requires_grad_()  # (30, 24), not contiguous
    weight = torch.randn(40, 24, generator=g, requires_grad=True)
    y = fast_linear(x, weight)
    y.sum().backward()
    torch.testing.assert_close(y, F.linear(x.detach(), weight.detach()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, weight.detach().sum(0).expand(30, 24), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, x.detach().sum(0).expand(40, 24), rtol=1e-5, atol=1e-5)


def test_fast_linear_is_f_linear_where_onednn_cannot_serve():
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(3, generator=g)
    for args in ((x.double(), weight.double(), bias.double()), (x[:0], weight, bias)):
        assert torch.equal(fast_linear(*args), F.linear(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's own linear: bfloat16 out
        assert fast_linear(x, weight, bias).dtype == torch.bfloat16


def test_fast_linear_names_mismatched_shapes():
    with pytest.raises(RuntimeError, match=r"shapes cannot be multiplied \(4x7 and 8x5\)"):
        FastLinear(8, 5)(torch.randn(4, 7))
    with pytest.raises(RuntimeError):
        fast_linear(torch.randn(4, 8), torch.randn(5, 8), torch.randn(3))


def test_fast_linear_module_is_a_drop_in_nn_linear():
    torch.manual_seed(3)
    fast = FastLinear(8, 5)
    torch.manual_seed(3)
    plain = torch.nn.Linear(8, 5)
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    x = torch.randn(4, 8)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-6)


@needs_onednn
def test_bench_kt_linear_reports_every_product(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import bench_kt_linear
    finally:
        sys.path.pop(0)
    out = bench_kt_linear.main(
        ["--rows", "64", "--shapes", "16x8", "--repeats", "1", "--warmup", "0", "--rounds", "1", "--json",
         str(tmp_path / "r.json")]
    )  # fmt: skip
    assert set(out["products"]) == {"64x16->8/forward", "64x16->8/grad_input", "64x16->8/grad_weight"}
    assert all(row["max_rel_difference"] < 1e-5 for row in out["products"].values())
    assert (tmp_path / "r.json").exists()
