"""benchmark_inference.py end to end on a tiny checkpoint: the files it writes, OOM handling, and that the
numbers it records agree with hand-worked values (KV cache bytes, token counts, throughput arithmetic)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pandas as pd
import pytest
import torch
from conftest import run_script, tiny_model

from llama.checkpoint import LLAMA3_TOKENIZER, load_checkpoint, save_hf
from llama.errors import UserError
from llama.tokenizer import Llama3Tokenizer
from project.bench.inference.config import grid, int_list
from project.bench.inference.prompt import prompt_tokens
from project.bench.inference.quality import HELDOUT, agreement
from project.bench.inference.report import limits_section, speed_table, stack_name
from project.bench.inference.results import summarize
from project.quant import QuantConfig, kernel_for

IN_LEN, OUT_LEN, REPEATS = 12, 5, 2
COLUMNS = [
    "stack",
    "kv_cache",
    "batch_size",
    "input_len",
    "output_len",
    "repeat",
    "status",
    "wall_s",
    "prefill_s",
    "decode_s",
    "ms_per_token",
    "tokens_per_s",
    "decode_tokens_per_s",
    "peak_mib",
    "peak_above_weights_mib",
    "weights_mib",
    "kv_cache_bytes",
    "n_generated",
    "tokens_sha",
    "prompt_sha",
    "device",
    "dtype",
    "threads",
    "torch_version",
    "commit",
]


COMMON = dict(device="cpu", dtype="fp32", threads=1, repeats=1, warmup=0)


def sha(rows) -> str:
    return hashlib.sha256(json.dumps([[int(t) for t in r] for r in rows]).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A 2-layer random model with the Llama 3 vocabulary, saved in Hugging Face layout with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    save_hf(tiny_model(seed=3, vocab_size=128256, max_seq_len=64), path)
    shutil.copy(LLAMA3_TOKENIZER, path / "tokenizer.model")
    return path


def bench(tiny_ckpt, out, *extra):
    proc = run_script(
        "benchmark_inference.py",
        "--ckpt_dir",
        tiny_ckpt,
        "--input_lens",
        IN_LEN,
        "--output_lens",
        OUT_LEN,
        "--repeats",
        REPEATS,
        "--warmup",
        1,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--threads",
        1,
        "--out",
        out,
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_weight_formats_and_their_quality(tiny_ckpt, tmp_path):
    """--quantize adds rows per weight format and quality.csv, whose reference perplexity is the one worked here."""
    out = tmp_path / "quant"
    bench(tiny_ckpt, out, "--batch_sizes", "1", "--kv", "on", "--quantize", "none,int8,int4")
    df = pd.read_csv(out / "results.csv")
    assert sorted(set(df.quantize)) == ["int4-g32", "int8", "none"] and (df.status == "ok").all()
    # By hand: the embedding table stays fp32 (the lookup), norms fp32, rotary table 8 fp32; every linear (and
    # the output projection's own copy) 1 byte a weight plus a scale per output row: bf16 for the packed CPU
    # kernel, the model's fp32 otherwise.
    scale = 2 if kernel_for(torch.device("cpu"), "int8") == "packed" else 4
    linears, rows = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 96 * 64, 64 + 32 + 32 + 64 + 96 + 64 + 96
    fp32 = 128256 * 64 + 2 * (2 * 64) + 64 + 8
    int8 = 4 * fp32 + 128256 * (64 + scale) + 2 * (linears + scale * rows)
    w = df.groupby("quantize").weights_mib.first()
    assert w["int8"] == pytest.approx(int8 / 2**20) and w["int4-g32"] < w["int8"] < w["none"]
    # A decode step reads all of them but the fp32 embedding table (untied here), of which it looks up one row.
    read, table = df.groupby("quantize").read_mib.first(), 4 * 128256 * 64 / 2**20
    assert read["int8"] == pytest.approx(int8 / 2**20 - table) and read["none"] == pytest.approx(w["none"] - table)
    q = pd.read_csv(out / "quality.csv").set_index("quantize")
    model, tok = load_checkpoint(tiny_ckpt, torch.float32, "cpu")
    ids = torch.tensor([tok.encode(HELDOUT.read_text(), bos=True)[: model.args.max_seq_len]])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()
    assert q.loc["none", "perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert q.loc["none", "identical_prompts"] == q.loc["none", "prompts"] == 4
    assert q.loc["int8", "perplexity_change"] == pytest.approx(q.loc["int8", "perplexity"] / math.exp(nll) - 1)
    assert "What each weight format costs in quality" in (out / "report.md").read_text()


def test_rounds_run_the_sweep_again_and_pool_the_repeats(tiny_ckpt, tmp_path):
    """--rounds 2: every configuration runs in two processes, the second round after the whole first one; the
    summary's medians pool both rounds' repeats, and a configuration that failed in either round shows the failure."""
    out = tmp_path / "rounds"
    proc = bench(tiny_ckpt, out, "--batch_sizes", "1,2", "--kv", "on", "--rounds", "2")
    order = [line.split("] ")[1].split(":")[0] for line in proc.stderr.splitlines() if "] ours" in line]
    assert len(order) == 4 and order[:2] == order[2:]  # round after round, not each configuration twice in a row
    df = pd.read_csv(out / "results.csv")
    assert df.groupby(["batch_size", "round"]).size().to_dict() == {(b, r): REPEATS for b in (1, 2) for r in (0, 1)}
    summary = pd.read_csv(out / "summary.csv").set_index("batch_size")
    assert summary.loc[1, "repeats"] == 2 * REPEATS
    assert summary.loc[1, "decode_s"] == pytest.approx(df[df.batch_size == 1].decode_s.median())
    text = (out / "report.md").read_text()
    assert "the whole sweep ran 2 times" in text and "differed between rounds by" in text
    rates = df[df.batch_size == 1].groupby("round").decode_tokens_per_s.median()
    assert summary.loc[1, "round_spread"] == pytest.approx(rates.max() / rates.min())
    second_failed = df[df.batch_size == 1].assign(status=lambda d: d["round"].map({0: "ok", 1: "timeout"}))
    assert summarize(second_failed).status.tolist() == ["timeout"]


def test_greedy_agreement_counts_identical_leading_tokens():
    got = agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 9], [4, 5, 6]])
    assert got == {"same_prefix_tokens": 2.5, "identical_prompts": 1, "prompts": 2}


def test_end_to_end_csv_markdown_and_oom(tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    # the matching child raises OutOfMemoryError after loading
    proc = bench(tiny_ckpt, out, "--batch_sizes", "1,2", "--kv", "both", "--simulate_oom", "batch_size=2,kv_cache=off")
    assert proc.stderr.count("] ours kv") == 4  # one progress line per configuration
    df = pd.read_csv(out / "results.csv")
    assert set(COLUMNS) <= set(df.columns)

    # One row per configuration and repeat; the simulated OOM is one row marked OOM, and the sweep went on.
    counts = df.groupby(["batch_size", "kv_cache"]).size().to_dict()
    assert counts == {(1, "on"): REPEATS, (1, "off"): REPEATS, (2, "on"): REPEATS, (2, "off"): 1}
    oom = df[(df.batch_size == 2) & (df.kv_cache == "off")].iloc[0]
    assert oom.status == "OOM" and pd.isna(oom.wall_s)
    ok = df[df.status == "ok"]
    assert len(ok) == 3 * REPEATS

    numeric = [
        "wall_s",
        "prefill_s",
        "decode_s",
        "ms_per_token",
        "tokens_per_s",
        "peak_mib",
        "weights_mib",
        "kv_cache_bytes",
    ]
    assert (ok[numeric] >= 0).all().all() and ok[numeric].notna().all().all()
    assert (ok.prefill_s > 0).all() and (ok.decode_s > 0).all()
    assert (ok.prefill_s + ok.decode_s <= ok.wall_s + 1e-6).all()  # both phases lie inside the timed call
    assert ok.tokens_per_s.values == pytest.approx((ok.batch_size * OUT_LEN / ok.wall_s).values)
    assert ok.ms_per_token.values == pytest.approx((1000 * ok.wall_s / OUT_LEN).values)
    assert (ok.n_generated == OUT_LEN).all()
    assert ok.device.eq("cpu").all() and ok.dtype.eq("fp32").all() and ok.threads.eq(1).all()
    assert ok.torch_version.eq(torch.__version__).all()

    # KV cache bytes by hand: k and v, 2 layers, batch, 2 kv heads, (prompt + new) positions, head dim 16, 4 bytes.
    on = ok[ok.kv_cache == "on"]
    assert (on.kv_cache_bytes == 2 * 2 * on.batch_size * 2 * (IN_LEN + OUT_LEN) * 16 * 4).all()
    assert (ok[ok.kv_cache == "off"].kv_cache_bytes == 0).all()
    # fp32 weights: embedding + output (128256 x 64 each), per layer wq, wo (64 x 64), wk, wv (32 x 64),
    # w1, w2, w3 (96 x 64) and two norms, plus the final norm.
    n_params = 2 * 128256 * 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96 + 2 * 64) + 64
    assert ok.weights_mib.values == pytest.approx(n_params * 4 / 2**20)

    # Same prompt everywhere; cache on and off generate the same tokens, and they are greedy decoding's tokens.
    model, tok = load_checkpoint(tiny_ckpt, torch.float32, "cpu")
    prompt = prompt_tokens(tok, IN_LEN)
    assert df.prompt_sha.nunique() == 1 and df.prompt_sha.iloc[0] == sha([prompt])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(OUT_LEN):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = ids[0, IN_LEN:].tolist()
    b1 = ok[ok.batch_size == 1]
    assert set(b1.tokens_sha) == {sha([expected])}
    assert set(ok[ok.batch_size == 2].tokens_sha) == {sha([expected, expected])}

    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4
    md = (out / "report.md").read_text()
    assert "python benchmark_inference.py --ckpt_dir" in md and "device: cpu" in md and torch.__version__ in md
    assert "| KV cache | | batch 1 | batch 2 |" in md
    for label in ("**with KV cache**", "**without KV cache**", "peak memory (MiB)", "runtime (s)", "tokens/s"):
        assert label in md
    assert "× (OOM)" in md
    assert "| | same tokens with and without cache | yes | – |" in md
    assert (out / "vs_batch_size.png").stat().st_size > 0


def test_prompt_has_exact_length():
    tok = Llama3Tokenizer(LLAMA3_TOKENIZER)
    for n in (1, 7, 256, 1000):
        ids = prompt_tokens(tok, n)
        assert len(ids) == n and ids[0] == tok.bos_id
    assert prompt_tokens(tok, 300)[:256] == prompt_tokens(tok, 256)


def test_list_flags():
    assert int_list((1, 8, 16), "batch_sizes") == [1, 8, 16]
    assert int_list(4, "batch_sizes") == [4]
    assert int_list("1,2", "batch_sizes") == [1, 2]
    for bad in ("a,b", 0, ()):
        with pytest.raises(UserError):
            int_list(bad, "batch_sizes")


def test_bad_flag_is_one_line_error(tiny_ckpt, tmp_path):
    proc = run_script("benchmark_inference.py", "--ckpt_dir", tiny_ckpt, "--kv", "maybe", "--out", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --kv must be on, off or both")
    assert "Traceback" not in proc.stderr


def test_a_failed_or_rejected_run_leaves_the_previous_results_as_they_were(tiny_ckpt, tmp_path):
    out = tmp_path / "bench"
    bench(tiny_ckpt, out, "--batch_sizes", "1", "--kv", "on")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"results.csv", "report.md"} <= set(before)
    rejected = run_script("benchmark_inference.py", "--ckpt_dir", tiny_ckpt, "--batch_sizes", "0", "--out", out)
    failed = run_script(*["benchmark_inference.py", "--ckpt_dir", tiny_ckpt, "--batch_sizes", "1", "--kv", "on",
                          "--input_lens", IN_LEN, "--output_lens", OUT_LEN, "--repeats", 1, "--device", "cpu",
                          "--simulate_oom", "batch_size=1", "--out", out])  # fmt: skip
    assert rejected.returncode == failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith("error: no configuration ran; the first was OOM")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not a byte changed
    partial = tmp_path / "bench.partial"
    assert "OOM" in (partial / "results.csv").read_text()  # the failed run's rows are kept beside


@pytest.mark.slow
def test_compare_hf_same_tokens(tiny_ckpt, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench"
    bench(tiny_ckpt, out, "--batch_sizes", "2", "--kv", "both", "--compare", "hf")
    df = pd.read_csv(out / "results.csv")
    assert set(df["stack"]) == {"ours", "hf"} and (df.status == "ok").all()
    assert df.tokens_sha.nunique() == 1  # ours and transformers, with and without cache: the same greedy tokens
    assert df.prompt_sha.nunique() == 1
    assert "## Hugging Face ÷ ours" in (out / "report.md").read_text()


def test_limits_section_scales_the_bound_by_bytes_per_weight():
    """machine_limits.py's bf16 bound of 20 tok/s means 10 in fp32, 40 in int8, 80 in int4 (bytes per weight)."""
    machine = {"device": "cpu", "llama3.2-1b_limits": {"decode_tok_per_s_batch1_bf16": 20.0}}
    summary = pd.DataFrame(
        [
            dict(stack="ours", quantize=q, batch_size=1, kv_cache="on", status="ok", decode_tokens_per_s=v)
            for q, v in (("none", 5.0), ("int8", 30.0), ("int4-g32", 20.0))
        ]
        + [dict(stack="hf", quantize="none", batch_size=1, kv_cache="on", status="ok", decode_tokens_per_s=4.0)]
    ).assign(dtype="fp32")
    lines = limits_section(machine, summary, "llama3.2-1b (random weights, seed 0)")
    rows = {line.split("|")[1].strip(): line.split("|")[3:5] for line in lines if line.startswith(("| none", "| int"))}
    assert [c.strip() for c in rows["none (fp32)"]] == ["10.0", "50%"]
    assert [c.strip() for c in rows["int8 (fp32)"]] == ["40.0", "75%"]
    assert [c.strip() for c in rows["int4-g32 (fp32)"]] == ["80.0", "25%"]
    assert "| device | cpu |" in lines and not limits_section(machine, summary, "SmolLM2")[-1].startswith("| int")
    # A memory read rate measured below the weight-read rate of the same run (CPU steal): the fastest one counts.
    slow = dict(machine, memory_read_GB_per_s=10.0, weight_read_GB_per_s={"fp32": 15.0, "bf16": 12.0})
    lines = limits_section(slow, summary, "llama3.2-1b (random weights, seed 0)")
    assert any("(15.0 GB/s)" in line for line in lines)
    assert next(line for line in lines if line.startswith("| none")).split("|")[3].strip() == "15.0"
    # Where the run recorded the bytes a decode step reads, the limit is the read rate over those bytes:
    # 15 GB/s over 1500 MiB (1.5729 GB) is 9.5 tokens/s, whatever the format's name says.
    measured = summary.assign(read_mib=[1500.0, 1500.0, 1500.0, None])
    lines = limits_section(slow, measured, "llama3.2-1b (random weights, seed 0)")
    assert {line.split("|")[3].strip() for line in lines if line.startswith(("| none", "| int"))} == {"9.5"}


def test_grid_compiled_and_llamacpp_variants():
    """--compile both: each configuration of ours eager and compiled, compiled only with the cache; llama.cpp: one
    run per weight format, batch 1 with its cache; Hugging Face once per configuration."""
    quants = [QuantConfig("none"), QuantConfig("int8")]
    specs = grid([1, 4], [8], [4], "both", ["ours", "hf", "llamacpp"], quants, "both", **COMMON)
    have = {(s.stack, s.quant.mode, s.compile, s.kv_cache, s.batch_size) for s in specs}
    assert len(have) == len(specs)
    want = {("ours", q, c, kv, b) for q in ("none", "int8") for c in (False, True) for kv in (True, False)
            for b in (1, 4) if kv or not c}  # fmt: skip
    want |= {("hf", "none", False, kv, b) for kv in (True, False) for b in (1, 4)}
    want |= {("llamacpp", q, False, True, 1) for q in ("none", "int8")}
    assert have == want
    # Two formats of ours with the same blocks (the output projection apart) share llama.cpp's file: one run.
    two = [QuantConfig("int4"), QuantConfig("int4", output="int4")]
    specs = grid([1], [8], [4], "on", ["ours", "llamacpp"], two, "off", **COMMON)
    assert [(s.stack, s.quant.name) for s in specs] == [
        ("ours", "int4-g32"),
        ("ours", "int4-g32, output int4"),
        ("llamacpp", "int4-g32"),
    ]
    with pytest.raises(UserError, match="--compile must be off, on or both"):
        grid([1], [8], [4], "on", ["ours"], quants, "sometimes", **COMMON)
    # A torch.compile mode besides the default names the compiled rows (their own rows in the tables).
    modes = ("default", "max-autotune")
    tuned = grid([1], [8], [4], "on", ["ours", "hf"], quants[:1], "both", compile_modes=modes, **COMMON)
    assert [s.decode for s in tuned] == ["eager", "compiled", "compiled (max-autotune)", "eager"]
    assert stack_name("ours", "int8", tuned[2].decode) == "ours (llama/), int8 weights, compiled decode (max-autotune)"


def test_speed_table_ratios_by_hand():
    """Ours against HF (same batch) and against llama.cpp on the same kind of weights, numbers worked by hand."""
    rows = [  # stack, quantize, decode, batch, prefill_s, decode tokens/s, tokens_sha
        ("ours", "none", "eager", 1, 0.5, 20.0, "a"),
        ("ours", "int8", "compiled", 1, 0.4, 60.0, "b"),
        ("hf", "none", "eager", 1, 1.0, 10.0, "a"),
        ("llamacpp", "int8", "eager", 1, 0.2, 40.0, "c"),
    ]
    cols = ["stack", "quantize", "decode", "batch_size", "prefill_s", "decode_tokens_per_s", "tokens_sha"]
    summary = pd.DataFrame(rows, columns=cols).assign(kv_cache="on", status="ok", input_len=8, output_len=4)
    table = {line.split(" | ")[2]: line.rstrip(" |").split(" | ") for line in speed_table(summary)[2:6]}
    ours, int8, cpp = (table[k] for k in ("ours (llama/)", "ours (llama/), int8 weights, compiled decode",
                                          "llama.cpp, Q8_0 weights"))  # fmt: skip
    assert ours[5:9] == ["2.00×", "2.00×", "–", "yes"]  # decode 20 / 10, HF prefill 1.0 / 0.5, no llama.cpp none
    assert int8[5:9] == ["6.00×", "2.50×", "1.50×", "no"]  # 60 / 10, 1.0 / 0.4, 60 / 40 (Q8_0 is int8's twin)
    assert cpp[5:8] == ["4.00×", "5.00×", "–"]


def test_compare_llamacpp_same_tokens_in_fp32(tiny_ckpt, tmp_path):
    """llama.cpp on our weights written as an f32 GGUF (and Q8_0 by its own quantizer): batch 1, the same prompt
    ids, the same greedy tokens as ours in fp32. Runs where llama-cpp-python is installed (CI skips it)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    out = tmp_path / "bench"
    bench(tiny_ckpt, out, "--batch_sizes", "1,2", "--kv", "on", "--compare", "llamacpp", "--quantize", "none,int8")
    df = pd.read_csv(out / "results.csv")
    assert (df.status == "ok").all() and df.prompt_sha.nunique() == 1
    cpp = df[df["stack"] == "llamacpp"]
    assert set(cpp.batch_size) == {1} and set(cpp.quantize) == {"none", "int8"}
    ours = df[(df["stack"] == "ours") & (df.batch_size == 1) & (df.quantize == "none")]
    assert set(cpp[cpp.quantize == "none"].tokens_sha) == set(ours.tokens_sha)
    assert "llama.cpp, Q8_0 weights" in (out / "report.md").read_text()
