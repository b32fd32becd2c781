"""llama/matmul.py: fp32 products on CPU through the BLAS or oneDNN, both against an fp64 reference, and how the
kernel is chosen (environment, the remembered choice, a measurement)."""

import json

import pytest
import torch
import torch.nn.functional as F

from llama import matmul
from llama.errors import UserError
from llama.matmul import linear

U = 2.0**-24  # fp32 unit roundoff

needs_onednn = pytest.mark.skipif(not matmul._onednn_available(), reason="this PyTorch has no oneDNN linear on CPU")


@pytest.fixture
def kernel(monkeypatch, request):
    """Run the test with request.param as the process's fp32 CPU kernel."""
    monkeypatch.setattr(matmul, "_chosen", request.param)
    return request.param


def sum_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|fl(a b) - a b| <= K u sum_k |a_k b_k| (any order of fp32 sums over K terms; Higham, eq. 3.5)."""
    return a.shape[-1] * U * (a.double().abs() @ b.double().abs())


@pytest.mark.parametrize("kernel", ["blas", pytest.param("onednn", marks=needs_onednn)], indirect=True)
def test_linear_and_its_gradients_are_fp32_products(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 96, generator=g, requires_grad=True)
    w = torch.randn(40, 96, generator=g, requires_grad=True)
    dy = torch.randn(2, 7, 40, generator=g)
    y = linear(x, w)
    assert y.shape == (2, 7, 40) and y.dtype == torch.float32
    y.backward(dy)
    x64, w64, dy64 = x.detach().double(), w.detach().double(), dy.double()
    for got, want, bound in (
        (y, x64 @ w64.T, sum_bound(x.detach(), w.detach().T)),
        (x.grad, dy64 @ w64, sum_bound(dy, w.detach())),
        (w.grad, dy64.flatten(0, 1).T @ x64.flatten(0, 1), sum_bound(dy.flatten(0, 1).T, x.detach().flatten(0, 1))),
    ):
        err = (got.detach().double() - want).abs()
        assert (err <= bound).all() and err.max() > 0  # rounded, and within the bound
    # A frozen weight (LoRA's base): only the input gradient, through a transposed weight view as the loss uses.
    x.grad = None
    w_frozen = w.detach().T.contiguous().T  # a (40, 96) view of a (96, 40) tensor
    linear(x, w_frozen).backward(dy)
    assert ((x.grad.double() - dy64 @ w64).abs() <= sum_bound(dy, w.detach())).all()


@needs_onednn
def test_both_kernels_agree_on_a_lora_model(monkeypatch):
    """The same tiny LoRA model's loss and adapter gradients through either kernel, within fp32 rounding."""
    from tiny_finetune import tiny_model

    from project.model.lora import LoRAConfig, apply_lora
    from project.train import loss_sum

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :10] = -100
    results = {}
    for kernel in ("blas", "onednn"):
        monkeypatch.setattr(matmul, "_chosen", kernel)
        torch.manual_seed(0)  # the adapters' A
        model = apply_lora(tiny_model(seed=3), LoRAConfig(dropout=0.0))
        for m in model.modules():
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B, std=0.02, generator=torch.Generator().manual_seed(2))
        loss = loss_sum(model, ids, labels)
        loss.backward()
        results[kernel] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (loss_b, grads_b), (loss_o, grads_o) = results["blas"], results["onednn"]
    assert loss_o == pytest.approx(loss_b, rel=1e-5)
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_o[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())


def test_other_dtypes_and_autocast_stay_with_f_linear(monkeypatch):
    monkeypatch.setattr(matmul, "_onednn", lambda *a: pytest.fail("oneDNN path taken"))
    monkeypatch.setattr(matmul, "_chosen", "onednn")
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    assert torch.equal(linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, w).dtype == torch.bfloat16
    assert linear(x[:0], w).shape == (0, 5)


def fresh_choice(monkeypatch, tmp_path, env=None):
    monkeypatch.setattr(matmul, "_chosen", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if env is None:
        monkeypatch.delenv(matmul.ENV, raising=False)
    else:
        monkeypatch.setenv(matmul.ENV, env)


def test_environment_sets_the_kernel(monkeypatch, tmp_path):
    fresh_choice(monkeypatch, tmp_path, "blas")
    assert matmul.cpu_fp32_kernel() == "blas"
    fresh_choice(monkeypatch, tmp_path, "gemm")
    with pytest.raises(UserError, match="auto, blas or onednn"):
        matmul.cpu_fp32_kernel()
    assert not (tmp_path / "efficient_llama").exists()  # nothing measured, nothing written


@needs_onednn
def test_the_measured_choice_is_remembered_per_machine(monkeypatch, tmp_path, capsys):
    fresh_choice(monkeypatch, tmp_path)
    monkeypatch.setattr(matmul, "_measure", lambda: ("onednn", 2.5))
    assert matmul.cpu_fp32_kernel() == "onednn"
    assert "onednn" in capsys.readouterr().err  # said once, when measured
    saved = json.loads(matmul.choice_file().read_text())
    assert saved == {matmul.machine_key(): {"kernel": "onednn", "onednn_over_blas": 2.5}}
    # A later process reads it back and measures nothing, whatever a new timing would say.
    fresh_choice(monkeypatch, tmp_path)
    monkeypatch.setattr(matmul, "_measure", lambda: pytest.fail("measured again"))
    assert matmul.cpu_fp32_kernel() == "onednn" and capsys.readouterr().err == ""
    # Another machine (or thread count) in the same file is measured and added beside it.
    fresh_choice(monkeypatch, tmp_path)
    monkeypatch.setattr(matmul, "machine_key", lambda: "another CPU")
    monkeypatch.setattr(matmul, "_measure", lambda: ("blas", 1.02))
    assert matmul.cpu_fp32_kernel() == "blas"
    assert set(json.loads(matmul.choice_file().read_text())) == {"another CPU", *saved}


@needs_onednn
def test_measurement_compares_the_two_kernels(monkeypatch):
    """_measure on the real kernels: a ratio of their speeds and the kernel it implies."""
    choice, ratio = matmul._measure()
    assert ratio > 0 and choice == ("onednn" if ratio >= matmul.ONEDNN_MARGIN else "blas")
