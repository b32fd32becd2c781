"""The memory meters against byte counts worked out by hand."""

import torch
from torch import nn

from llama.model import ModelArgs, Transformer
from project.checkpointing import apply_checkpointing
from project.memory import SavedTensorMeter, gradient_bytes, memory_timeline, optimizer_state_bytes, parameter_bytes


class TwoLinear(nn.Module):
    """y = W2 relu(W1 x): autograd saves x (for dW1), relu's output (for dW2 and relu' ), nothing else."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 32, bias=False)
        self.l2 = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def test_saved_activation_bytes_match_hand_count():
    torch.manual_seed(0)
    m = TwoLinear()
    x = torch.randn(4, 16, requires_grad=True)
    with SavedTensorMeter(exclude=m.parameters()) as meter:
        m(x).sum()
    # x: 4*16 fp32; relu output (saved by relu's backward and by l2 for dW2, one storage): 4*32 fp32.
    assert meter.bytes == (4 * 16 + 4 * 32) * 4


def test_saved_bytes_dedupe_views_and_skip_parameters():
    w = nn.Parameter(torch.randn(8, 8))
    x = torch.randn(8, 8, requires_grad=True)
    with SavedTensorMeter(exclude=[w]) as meter:
        (x[:4] @ w).sum() + (x[4:] @ w).sum()  # both views of x share one 256-byte storage
    assert meter.bytes == 8 * 8 * 4


def _tiny():
    torch.manual_seed(0)
    return Transformer(
        ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=128, max_seq_len=64)
    )


def test_checkpointing_every_block_lowers_saved_bytes():
    model, x = _tiny(), torch.randint(0, 128, (2, 32))
    with SavedTensorMeter(exclude=model.parameters()) as plain:
        model(x).sum()
    apply_checkpointing(model, "all")
    with SavedTensorMeter(exclude=model.parameters()) as ckpt:
        model(x).sum()
    # Checkpointed blocks keep only their inputs: at least one (B, T, D) fp32 tensor per block.
    assert 4 * 2 * 32 * 64 * 4 <= ckpt.bytes < plain.bytes / 3


def test_parameter_gradient_optimizer_bytes():
    model = _tiny()
    n = sum(p.numel() for p in model.parameters())
    assert parameter_bytes(model) == n * 4
    assert gradient_bytes(model) == 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 128, (1, 8))).sum().backward()
    opt.step()
    assert gradient_bytes(model) == n * 4
    # AdamW keeps exp_avg and exp_avg_sq per parameter (fp32) plus a scalar step per parameter tensor.
    n_tensors = len(list(model.parameters()))
    assert optimizer_state_bytes(opt) == 2 * n * 4 + n_tensors * 4
    assert optimizer_state_bytes(torch.optim.SGD(model.parameters(), lr=1e-3)) == 0


def test_memory_timeline_sees_parameters_and_gradients():
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        model(torch.randint(0, 128, (1, 16))).float().sum().backward()
        opt.step()

    tl = memory_timeline(step, torch.device("cpu"))
    peak = {c: max(row[i] for row in tl["bytes"]) for i, c in enumerate(tl["categories"])}
    assert peak["gradient"] >= parameter_bytes(model) * 0.9
    assert peak["activation"] > 0
    assert tl["t_ms"] == sorted(tl["t_ms"])


PEAK_PROBE = """
import json, torch
from project.memory import MiB, PeakMemory, rss_bytes
out = {}
for name, n in (("first", 64 * MiB), ("second", 16 * MiB)):  # float32: 256 MiB, then 64 MiB, every page touched
    with PeakMemory("cpu") as peak:
        start = rss_bytes()
        x = torch.ones(n)
        del x
    out[name] = [peak.rss - start, peak.reset_ok, peak.peak == peak.rss, peak.allocated]
print(json.dumps(out))
"""


def test_cpu_peak_sees_a_known_allocation_in_bytes_and_resets_between_blocks():
    """256 MiB filled inside the block raise the peak by 256 MiB (bytes, not KiB); a second block with 64 MiB
    sees 64 MiB, not the first block's peak. In a fresh process (glibc's defaults: blocks this large come from
    mmap and leave on free), so that memory an earlier test freed cannot serve the allocation unseen."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    from llama.checkpoint import REPO_ROOT
    from project.memory import MiB

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", PEAK_PROBE], cwd=REPO_ROOT, env=dict(env, PYTHONPATH=str(REPO_ROOT)),
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if not got["first"][1]:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    assert 250 * MiB <= got["first"][0] < 256 * MiB + 48 * MiB  # a few pages of `start` may leave meanwhile
    assert 60 * MiB <= got["second"][0] < 64 * MiB + 48 * MiB  # the reset forgot the first block's peak
    assert got["first"][2] and got["first"][3] == 0  # on CPU the headline peak is the RSS


def test_decode_read_bytes_counts_the_embedding_table_only_where_the_output_reads_it():
    """Worked by hand for the tiny model (dim 64, 2 layers, 4 heads of 16, 2 kv heads, hidden 96, vocab 256)."""
    from conftest import tiny_model

    from project.memory import decode_read_bytes
    from project.quant import QuantConfig, quantize

    block_shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]  # wq wk wv wo w1 w3 w2
    norms_and_rope = 4 * (2 * 2 * 64 + 64) + 4 * 8  # fp32 norm weights, inv_freq (head dim / 2)
    blocks = 2 * sum(n * k for n, k in block_shapes)
    table = 256 * 64
    tied = tiny_model(tie_word_embeddings=True)
    assert decode_read_bytes(tied) == 4 * (blocks + table) + norms_and_rope  # the table is the output projection
    untied = tiny_model()
    assert decode_read_bytes(untied) == 4 * (blocks + table) + norms_and_rope  # the output's own matrix, not the table
    quantize(tied, QuantConfig("int8"))  # int8 levels and one bf16 scale per output row (packed kernel, CPU)
    int8 = 2 * sum(n * k + 2 * n for n, k in block_shapes) + table + 2 * 256
    assert decode_read_bytes(tied) == int8 + norms_and_rope  # the full-precision table is only looked up
