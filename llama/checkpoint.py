"""Loading and saving weights: Meta (`consolidated.00.pth`), Hugging Face (safetensors), GGUF, random shapes.

Every loader builds the model on the meta device, then converts one tensor at a time to the chosen
dtype and device and assigns it, so two full copies of the weights never exist at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import UserError
from .gguf_file import read_gguf
from .model import ModelArgs, RopeScaling, Transformer, init_weights
from .tokenizer import ByteBPETokenizer, Llama3Tokenizer, load_tokenizer_file

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO_ROOT / "checkpoints"
DEFAULT_CKPT_DIR = CHECKPOINTS / "SmolLM2-135M-Instruct"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (the default; GGUF Q4_1, dequantised)"
LLAMA3_TOKENIZER = CHECKPOINTS / "llama3-tokenizer" / "tokenizer.model"
META_DEFAULT_DIR = Path("~/.llama/checkpoints/Llama3.2-1B").expanduser()

SHAPES = {
    # Llama 3.2-1B exactly (HF config.json of meta-llama/Llama-3.2-1B): 1,235,814,400 parameters.
    "llama3.2-1b": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        hidden_dim=8192,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
}

SETUP_HINT = (
    "run `make setup` to fetch the default model, or pass --ckpt_dir with a Meta, Hugging Face or GGUF checkpoint"
)


# ---- building the model from tensors ---------------------------------------------------------------
def build_from_tensors(args: ModelArgs, tensors: Iterator[tuple[str, torch.Tensor]], dtype, device) -> Transformer:
    """Assign (Meta-named) tensors to a model built on the meta device, checking names and shapes."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for name, t in tensors:
        if name not in expected:
            raise UserError(
                f"checkpoint has an unexpected tensor {name!r}: it is not a Llama 3 checkpoint this loader knows"
            )
        if tuple(t.shape) != tuple(expected[name]):
            raise UserError(
                f"tensor {name!r} has shape {tuple(t.shape)} but the config implies {tuple(expected[name])}: "
                "the config does not match the weights"
            )
        state[name] = t.to(device=device, dtype=dtype)
    if args.tie_word_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(
            f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}: it is incomplete or not a Llama checkpoint"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.reset_rope(device)
    return model.eval()


def random_model(shape: str, dtype, device, seed: int = 0) -> tuple[Transformer, Llama3Tokenizer]:
    """The named shape with random weights (for performance work) and the real Llama 3 tokenizer."""
    if shape not in SHAPES:
        raise UserError(f"unknown --shape {shape!r}: choose one of {', '.join(SHAPES)}")
    with torch.device("meta"):
        model = Transformer(SHAPES[shape])
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()  # to_empty unties: tie first, so no untied output matrix is ever filled and dropped
    init_weights(model, seed)
    model.reset_rope(device)
    return model.eval(), load_llama3_tokenizer()


def load_llama3_tokenizer(path: Path = LLAMA3_TOKENIZER) -> Llama3Tokenizer:
    if not path.exists():
        raise UserError(
            f"Llama 3 tokenizer not found at {path}: run `make setup` (it takes it from the llama-models package)"
        )
    return Llama3Tokenizer(path)


# ---- format detection ---------------------------------------------------------------------------------
def load_checkpoint(ckpt_dir: str | os.PathLike | None, dtype=torch.bfloat16, device="cpu"):
    """Load (model, tokenizer) from a Meta, Hugging Face or GGUF checkpoint folder (or a .gguf file)."""
    path = Path(ckpt_dir).expanduser() if ckpt_dir else DEFAULT_CKPT_DIR
    if not path.exists():
        hint = SETUP_HINT if path == DEFAULT_CKPT_DIR else "check the path, or omit --ckpt_dir to use the default model"
        raise UserError(f"checkpoint not found: {path} ({hint})")
    device = torch.device(device)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if path.is_file() and path.suffix == ".gguf":
        loader = functools.partial(load_gguf, path)
    elif path.is_dir() and (path / "params.json").exists():
        loader = functools.partial(load_meta, path)
    elif path.is_dir() and (path / "config.json").exists():
        loader = functools.partial(load_hf, path)
    elif len(ggufs) == 1:
        loader = functools.partial(load_gguf, ggufs[0])
    else:
        loader = None
    if loader is not None:
        model, tokenizer = loader(dtype, device)
        if tokenizer.n_words > model.args.vocab_size:  # ids past the embedding table would fail mid-generation
            raise UserError(
                f"{path}: the tokenizer has {tokenizer.n_words:,} tokens but the model's embedding only "
                f"{model.args.vocab_size:,} rows: they come from different models (a tokenizer.model from "
                "another checkpoint?)"
            )
        return model, tokenizer
    if len(ggufs) > 1:
        raise UserError(f"{path} holds {len(ggufs)} .gguf files: pass the one you want as --ckpt_dir")
    raise UserError(
        f"{path} is not a checkpoint: expected params.json + consolidated.00.pth (Meta), "
        "config.json + *.safetensors (Hugging Face), or a .gguf file"
    )


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: a checkpoint (None: the embedded default) or a named shape with
    random weights. Passed whole through the CLIs, the benchmarks' child processes and the files they write."""

    ckpt_dir: Optional[str] = None
    shape: Optional[str] = None
    seed: int = 0  # random weights only

    def __post_init__(self):
        if self.ckpt_dir and self.shape:
            raise UserError("give --ckpt_dir or --shape, not both")
        if self.shape and self.shape not in SHAPES:
            raise UserError(f"unknown --shape {self.shape!r}: choose one of {', '.join(SHAPES)}")

    @property
    def name(self) -> str:
        if self.shape:
            return f"{self.shape} (random weights, seed {self.seed})"
        return str(self.ckpt_dir) if self.ckpt_dir else DEFAULT_MODEL_NAME

    def load(self, dtype, device) -> tuple[Transformer, object]:
        """(model, tokenizer) in dtype on device."""
        if self.shape:
            return random_model(self.shape, dtype, device, self.seed)
        return load_checkpoint(self.ckpt_dir, dtype, device)


# ---- Meta ---------------------------------------------------------------------------------------------
def meta_args(params: dict) -> ModelArgs:
    """ModelArgs from Meta's params.json (or the richer one `save_meta` writes)."""
    params = dict(params)
    if params.pop("use_scaled_rope", False) and "rope_scaling" not in params:
        # Meta's params.json does not record the factor: Llama 3.2's 1B/3B (dim <= 3072) use 32, Llama 3.1 uses 8.
        default = 32.0 if params.get("dim", 0) <= 3072 else 8.0
        params["rope_scaling"] = {"factor": params.get("rope_scaling_factor", default)}
    return ModelArgs.from_dict(params)


def load_meta(path: Path, dtype, device):
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{path} has params.json but no consolidated.00.pth")
    if len(shards) > 1:
        raise UserError(
            f"{path} has {len(shards)} model-parallel shards; only single-file checkpoints (1B-8B) are supported"
        )
    try:
        args = meta_args(json.loads((path / "params.json").read_text()))
    except (ValueError, TypeError) as e:
        raise UserError(f"{path / 'params.json'}: {e}") from None
    own = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")  # as Meta and Hugging Face keep them
    tokenizer = hf_tokenizer(path) if any((path / f).exists() for f in own) else load_llama3_tokenizer()
    try:
        sd = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or non-PyTorch file
        raise UserError(f"cannot read {shards[0]}: {str(e).splitlines()[0]}") from None
    sd.pop("rope.freqs", None)  # Llama 2 checkpoints store the (recomputed) rotary table
    if "output.weight" not in sd or torch.equal(sd["output.weight"], sd["tok_embeddings.weight"]):
        args.tie_word_embeddings = True
        sd.pop("output.weight", None)
    model = build_from_tensors(args, _pop_all(sd), dtype, device)
    return model, tokenizer


def _pop_all(sd: dict) -> Iterator[tuple[str, torch.Tensor]]:
    while sd:
        name = next(iter(sd))
        yield name, sd.pop(name)


def save_meta(model: Transformer, out_dir: str | Path, tokenizer_file: Path | None = None):
    """Write consolidated.00.pth + params.json (atomically), loadable by `load_meta`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items() if not (model.args.tie_word_embeddings and k == "output.weight")}
    atomic_write(out / "consolidated.00.pth", lambda f: torch.save(sd, f))
    params = asdict(model.args)
    atomic_write(out / "params.json", json.dumps(params, indent=2))
    if tokenizer_file is not None:
        atomic_write(out / "tokenizer.model", Path(tokenizer_file).read_bytes())


def atomic_write(path: Path, data: str | bytes | Callable):
    """Write data (text as UTF-8, bytes, or a function given the open binary file) through a temporary file in
    the same folder, then rename it into place: readers never see half a file. Ctrl-C or SIGTERM during the
    write takes effect once it is done (an interrupted torch.save would fail with a C++ error instead)."""
    if isinstance(data, (str, bytes)):
        payload = data.encode() if isinstance(data, str) else data
        data = lambda f: f.write(payload)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        data(f)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary path beside path for a writer that wants a file name (atomic_write's rules): renamed to path
    when the block ends normally, removed when it raises."""
    path = Path(path)
    with signals_deferred():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a written file gets the usual mode
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_torch_file(path: Path, what: str, keys: tuple[str, ...] = ()) -> dict:
    """torch.load(weights_only=True) of a file this project wrote: any file that cannot be read, or that lacks
    one of keys, is one UserError naming the file (never torch's advice to load untrusted pickles in full)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (EOFError, RuntimeError), not a pickle (UnpicklingError), unreadable (OSError)
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        if "weights_only" in text or "Weights only" in text:
            reason = "it holds objects other than tensors and plain data"
        raise UserError(f"cannot read {what} {path}: {reason} (corrupt, truncated, or another kind of file?)") from None
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UserError(f"{what} {path} is not one this project wrote: it has no {', '.join(missing)}")
    return obj


STALE_TEMP = re.compile(r".+\.[a-z0-9_]{8}\.tmp")  # what atomic_write's mkstemp names look like


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files a killed atomic_write left in folder (call it before a job writes there)."""
    stale = [p for p in Path(folder).glob("*.tmp") if STALE_TEMP.fullmatch(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM back until the block is done (POSIX, main thread); elsewhere a plain block."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal that came meanwhile is delivered now


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- Hugging Face --------------------------------------------------------------------------------------
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def hf_to_meta_name(name: str) -> str:
    if name in HF_NAMES:
        return HF_NAMES[name]
    parts = name.split(".")  # model.layers.N.<module path>.weight
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        module = ".".join(parts[3:-1])
        if module in HF_LAYER_NAMES:
            return f"layers.{parts[2]}.{HF_LAYER_NAMES[module]}.{parts[-1]}"
    return name


def meta_to_hf_name(name: str) -> str:
    inverse = {v: k for k, v in HF_NAMES.items()}
    if name in inverse:
        return inverse[name]
    layer_inverse = {v: k for k, v in HF_LAYER_NAMES.items()}
    _, n, *module, leaf = name.split(".")
    return f"model.layers.{n}.{layer_inverse['.'.join(module)]}.{leaf}"


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows: HF pairs dimension i with i + d/2 in each head; Meta pairs 2i with 2i+1."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_args(cfg: dict) -> ModelArgs:
    if cfg.get("model_type", "llama") != "llama":
        raise UserError(f"config.json has model_type {cfg['model_type']!r}; only 'llama' is supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError("config.json asks for attention or MLP biases, which Llama 3 does not have")
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(f"rope type {rope_type!r} is not supported (only default and llama3)")
    args = ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"),
        vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=rope if rope_type == "llama3" else None,
        max_seq_len=cfg.get("max_position_embeddings", 8192),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    )
    if cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise UserError(
            "config.json sets head_dim != hidden_size / num_attention_heads, which this model does not support"
        )
    return args


def load_hf(path: Path, dtype, device):
    from safetensors import safe_open

    try:
        args = hf_args(json.loads((path / "config.json").read_text()))
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"{path / 'config.json'} is not a Llama config: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has config.json but no *.safetensors weights")

    def tensors():
        for file in files:
            try:
                f = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors' own error type: a truncated file, a header that is not JSON
                raise UserError(f"cannot read {file}: {e} (truncated, or not a safetensors file?)") from None
            with f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    meta = hf_to_meta_name(name)
                    if meta.endswith("attention.wq.weight"):
                        t = rotate_half_to_interleaved(t, args.n_heads)
                    elif meta.endswith("attention.wk.weight"):
                        t = rotate_half_to_interleaved(t, args.n_kv_heads)
                    yield meta, t

    model = build_from_tensors(args, tensors(), dtype, device)
    return model, hf_tokenizer(path)


def hf_tokenizer(path: Path):
    """tokenizer.model (Llama 3 tiktoken or SentencePiece) if present, else tokenizer.json (byte-level BPE)."""
    for candidate in (path / "tokenizer.model", path / "original" / "tokenizer.model"):
        if candidate.exists():
            return load_tokenizer_file(candidate)
    if (path / "tokenizer.json").exists():
        return ByteBPETokenizer.from_hf_files(path)
    raise UserError(f"{path} has no tokenizer.model or tokenizer.json")


def save_hf(model: Transformer, out_dir: str | Path):
    """Write config.json + model.safetensors in the Hugging Face Llama layout (q/k rows in rotate-half order)."""
    a = model.args
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        if a.tie_word_embeddings and name == "output.weight":
            continue
        if name.endswith("attention.wq.weight"):
            t = interleaved_to_rotate_half(t, a.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = interleaved_to_rotate_half(t, a.n_kv_heads)
        tensors[meta_to_hf_name(name)] = t.contiguous()
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.dim,
        "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size,
        "intermediate_size": a.hidden_dim,
        "rms_norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta,
        "max_position_embeddings": a.max_seq_len,
        "tie_word_embeddings": a.tie_word_embeddings,
        "hidden_act": "silu",
        "head_dim": a.head_dim,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype_name[model.tok_embeddings.weight.dtype],
        "rope_scaling": {"rope_type": "llama3", **asdict(a.rope_scaling)} if a.rope_scaling else None,
    }
    atomic_write(out / "model.safetensors", _safetensors_bytes(tensors))
    atomic_write(out / "config.json", json.dumps(cfg, indent=2))


def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"format": "pt"})


# ---- GGUF -------------------------------------------------------------------------------------------------
GGUF_NAMES = {
    "token_embd": "tok_embeddings",
    "output_norm": "norm",
    "output": "output",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}


def gguf_to_meta_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{GGUF_NAMES.get(parts[2], parts[2])}.{parts[3]}"
    return f"{GGUF_NAMES.get(parts[0], parts[0])}.{parts[1]}"


def gguf_args(meta: dict, tensor_names: set[str]) -> ModelArgs:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture is {arch!r}; only 'llama' is supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise UserError(f"GGUF rope scaling {scaling!r} is not supported")
    n_heads = meta["llama.attention.head_count"]
    args = ModelArgs(
        dim=meta["llama.embedding_length"],
        n_layers=meta["llama.block_count"],
        n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads),
        vocab_size=meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        hidden_dim=meta["llama.feed_forward_length"],
        norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        max_seq_len=meta.get("llama.context_length", 8192),
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    if meta.get("llama.rope.dimension_count", args.head_dim) != args.head_dim:
        raise UserError("GGUF rotary dimension differs from the head dimension: not supported")
    return args


def load_gguf(path: Path, dtype, device):
    """GGUF (llama.cpp): q/k rows are already in Meta's interleaved order; each tensor is dequantised alone."""
    from gguf.quants import dequantize

    try:
        meta, tensors = read_gguf(path)
    except (ValueError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise UserError(f"cannot read GGUF file {path}: {e}") from None
    by_name = {t.name: t for t in tensors}
    args = gguf_args(meta, set(by_name))
    if "rope_freqs.weight" in by_name:  # Llama 3.1+ GGUFs store the scaled-rope factors as a tensor
        t = by_name.pop("rope_freqs.weight")
        args.rope_freq_factors = dequantize(t.data, t.qtype).tolist()
    if meta.get("tokenizer.ggml.model") == "llama":
        raise UserError(
            "this GGUF carries a SentencePiece tokenizer; only byte-level BPE GGUF tokenizers are supported"
        )

    def weights():
        for name, t in by_name.items():
            # F32/F16 come back as read-only views of the memory-mapped file: copy those (only those).
            values = np.require(dequantize(t.data, t.qtype), requirements="W")
            yield gguf_to_meta_name(name), torch.from_numpy(values)

    model = build_from_tensors(args, weights(), dtype, device)
    return model, ByteBPETokenizer.from_gguf_fields(meta)
