"""The label-only chunked loss (project/loss.py) against the plain full-logits cross-entropy."""

import pytest
import torch
import torch.nn.functional as F
from tiny_finetune import RECORDS, byte_tokenizer, grads, tiny_model

from project import loss as loss_module
from project.data import IGNORE_INDEX, build_dataset, collate
from project.loss import LinearCrossEntropy, TiedLookup, linear_cross_entropy
from project.model.lora import LoRAConfig, apply_lora
from project.train import loss_sum


def full_logits_loss(model, ids, labels):
    """The loss as it was: fp32 logits at every position, -100 labels ignored, summed."""
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")  # fmt: skip


def batch():
    ds = build_dataset(RECORDS[:3], byte_tokenizer(), max_seq_len=512)
    ids, labels = collate(ds.examples, pad_id=257)
    assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()  # prompts, padding and answers
    return ids, labels


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 1000])  # one row per chunk, several ragged chunks, one chunk
def test_loss_and_gradients_equal_the_plain_cross_entropy(weight_grad, rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=weight_grad)
    t = torch.randint(0, 50, (10,), generator=g)
    ours = LinearCrossEntropy.apply(h, w, t, rows)
    (ours * 0.7).backward()  # an incoming gradient other than 1
    got_h, got_w = h.grad.clone(), (w.grad.clone() if weight_grad else None)
    h.grad = w.grad = None
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    (ref * 0.7).backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(got_h, h.grad, rtol=1e-10, atol=1e-12)
    if weight_grad:
        torch.testing.assert_close(got_w, w.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lora", [False, True])
def test_model_loss_and_gradients_equal_the_full_logits_loss(lora, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 259 * 5)  # chunks of 5 rows: several per batch
    ids, labels = batch()
    results = []
    for fn in (full_logits_loss, loss_sum):
        model = tiny_model(tie_word_embeddings=True)
        if lora:
            torch.manual_seed(0)
            apply_lora(model, LoRAConfig(dropout=0.0))
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        loss = fn(model, ids, labels)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (ref_loss, ref_grads), (our_loss, our_grads) = results
    torch.testing.assert_close(our_loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert set(our_grads) == set(ref_grads) and len(our_grads) > 2
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_under_autocast_the_matmuls_run_in_the_autocast_dtype_and_the_loss_in_fp32():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g)
    t = torch.randint(0, 40, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t)
        ref = F.cross_entropy((h @ w.T).float(), t, reduction="sum")  # autocast's bf16 matmul, fp32 loss
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)  # the same bf16 logits
    fp32 = F.cross_entropy(h.detach() @ w.T, t, reduction="sum")
    assert not torch.allclose(ours, fp32, rtol=1e-6, atol=0)  # ... which are not the fp32 ones
    ours.backward()
    assert h.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()


def test_no_labels_gives_zero_loss_and_zero_gradient():
    h = torch.randn(0, 8, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(30, 8), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.shape == (0, 8)


@pytest.mark.parametrize("projection_used", [True, False])
def test_tied_lookup_gives_the_weight_both_gradients(projection_used):
    """TiedLookup's weight gradient = autograd's for W used twice (lookup with repeated tokens + projection), fp64."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[3, 7, 3], [0, 3, 29]])  # token 3 three times: its rows must add up
    up = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)  # an incoming gradient for the embeddings

    def loss(embeddings, weight):
        out = (embeddings * up).sum()
        return out + (embeddings[0] @ weight.T).square().sum() if projection_used else out

    loss(*TiedLookup.apply(w, tokens)).backward()
    ours, w.grad = w.grad, None
    loss(F.embedding(tokens, w), w).backward()
    torch.testing.assert_close(ours, w.grad, rtol=1e-12, atol=1e-12)


def test_a_tied_weight_gets_its_gradient_in_the_loss_buffer():
    """Full fine-tuning of a tied model: backward allocates one vocabulary x dim buffer, the loss's, and it becomes
    the weight's gradient (autograd's own sum would allocate a second one for the lookup's gradient)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_model(tie_word_embeddings=True)
    weight = model.tok_embeddings.weight
    ids, labels = batch()
    big = {}

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.numel() == weight.numel():  # V x D, in any layout
                    big[o.untyped_storage().data_ptr()] = func
            return out

    loss = loss_sum(model, ids, labels)
    with Allocations():
        loss.backward()
    big.pop(weight.untyped_storage().data_ptr(), None)  # views of the weight itself
    assert list(big) == [weight.grad.untyped_storage().data_ptr()], big
    model.zero_grad(set_to_none=True)
    h, targets = model(ids, hidden=True)[:, :-1], labels[:, 1:]  # the same loss with autograd summing at W
    ref = linear_cross_entropy(h[targets != IGNORE_INDEX], weight, targets[targets != IGNORE_INDEX])
    big.clear()
    with Allocations():
        ref.backward()
    big.pop(weight.untyped_storage().data_ptr(), None)
    assert len(big) >= 2  # the check can fail: autograd's own sum holds the lookup's dense gradient too
