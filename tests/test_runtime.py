"""The dtype rule: the device's 16-bit dtype only where its matrix instructions exist in hardware."""

import torch

from llama import runtime

CPU = torch.device("cpu")


def test_bf16_needs_the_instructions_not_only_onednn(monkeypatch):
    # oneDNN says yes on AVX-512 CPUs without BF16 instructions (it converts): the flags decide.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert not runtime.has_native_matmul(CPU, torch.bfloat16)
    assert runtime.resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert runtime.has_native_matmul(CPU, torch.bfloat16)
    assert runtime.resolve_dtype("auto", CPU) == torch.bfloat16
    # Instructions present but oneDNN will not use them: still no.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not runtime.has_native_matmul(CPU, torch.bfloat16)


def test_fp32_is_always_native_and_explicit_dtypes_are_kept():
    assert runtime.has_native_matmul(CPU, torch.float32)
    assert runtime.resolve_dtype("bf16", CPU) == torch.bfloat16 and runtime.resolve_dtype("fp16", CPU) == torch.float16


def test_list_flags_as_fire_passes_them():
    from project.cli import name_list

    assert name_list(("wq", "wv")) == name_list("wq,wv") == name_list("wq, wv") == name_list("wq wv") == ("wq", "wv")
    assert name_list("none") == ("none",) and name_list(()) == () and name_list(["a", " ", "b"]) == ("a", "b")
