"""Fine-tuning on several processes with PyTorch's own engine: `torchrun` + DDP or FSDP2.

    torchrun --nproc_per_node 2 finetuning.py --distributed ddp  --grad_accum 4    # = 1 process, --grad_accum 8
    torchrun --nproc_per_node 2 finetuning.py --distributed fsdp --grad_accum 4

torchrun starts one process per rank and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; `setup` joins them
(NCCL on CUDA, gloo on CPU). What stays exactly as in one process:

- **Data.** `--grad_accum k` is per rank: each optimizer step takes the window of N·k micro-batches that one
  process with `--grad_accum N·k` would take (same seed, same order), and rank r trains on its r-th k-slice.
- **The loss.** Every micro-batch's summed loss is divided by the label tokens of the whole window on all ranks
  (an all-reduce), and multiplied by N because DDP and FSDP average gradients over ranks: the synchronised
  gradient is that of the window's mean loss. Gradients are synchronised once per optimizer step, at the
  window's last micro-batch (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync`); a rank whose slice of a
  short last window is empty runs one micro-batch without labels, so that it still joins the synchronisation.
- **DDP** keeps a full replica per rank; **FSDP2** (`fully_shard` per transformer block, then the whole model)
  shards parameters, gradients and optimizer state: each rank holds 1/N of them between uses. Frozen LoRA
  bases are sharded too; only the adapters train.
- **Checkpoints** go through `torch.distributed.checkpoint` (each rank writes its shards) into a fresh folder that
  replaces `run_dir/training_state/` only once every rank has written it; `--resume` reads it back on the same
  or another number of ranks (DCP reshards). The RNG state is saved per rank.
- Logging, the progress bar, samples, reports and exports happen on rank 0; any failing rank ends the job
  (torchrun stops the others).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from llama.errors import UserError
from llama.matmul import cpu_fp32_kernel, set_cpu_fp32_kernel
from project.frozen_base import QUANTIZED

MODES = ("ddp", "fsdp")
STATE_DIR = "training_state"  # under --run_dir: the distributed training state (a DCP folder)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank of world, the local rank (its GPU on a node) and the mode."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"  # none (one process), ddp or fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.mode != "none"


SINGLE = Ranks()


def launched() -> bool:
    """True inside a torchrun worker (or any launcher that sets the same variables) of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(mode: str | None, device: torch.device) -> Ranks:
    """Join the process group torchrun describes; mode None picks ddp when launched with several processes.
    One process without --distributed is plain training (SINGLE)."""
    if mode not in (None, "none", *MODES):
        raise UserError(f"--distributed must be ddp or fsdp (or none), not {mode!r}")
    if not launched():
        if mode in MODES:
            raise UserError(f"--distributed {mode} needs several processes: start it with torchrun --nproc_per_node N")
        return SINGLE
    if mode == "none":
        raise UserError("launched by torchrun with several processes: pass --distributed ddp or fsdp")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":  # every rank sums its fp32 products in one order: rank 0's kernel (llama/matmul.py)
        kernel = [cpu_fp32_kernel() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(kernel, src=0)
        set_cpu_fp32_kernel(kernel[0])
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, mode or "ddp")


def fsdp_refusal(base: str, precision: str) -> str | None:
    """Why FSDP cannot train this setup (None if it can)."""
    if base in QUANTIZED or precision == "fp16":
        return (
            "--distributed fsdp shards full-precision or bf16 weights: quantized bases are buffers it does not shard "
            "and fp16's GradScaler would check only each rank's shard; use --distributed ddp"
        )
    return None


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """Each rank's own GPU on a CUDA node; the CPU (or MPS) as it is."""
    return torch.device("cuda", ranks.local_rank) if device.type == "cuda" and ranks.on else device


def teardown(ranks: Ranks):
    """Leave the process group together: the other ranks finish before rank 0 has saved and exported, and one of
    them exiting meanwhile once aborted in gloo's teardown ("terminate called without an active exception"), which
    made torchrun stop rank 0 mid-save."""
    if ranks.on and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- wrapping --------------------------------------------------------------------------------------------
def wrap(net: nn.Module, ranks: Ranks, param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP around net, or FSDP2 around each transformer block of net.model and then net itself.

    param_dtype: FSDP's mixed-precision policy (parameters gathered in it, gradients reduced in fp32)."""
    if ranks.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ranks.local_rank] if next(net.parameters()).is_cuda else None
        return DistributedDataParallel(net, device_ids=device_ids)
    if ranks.mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in net.model.layers:
            fully_shard(block, mp_policy=policy)
        return fully_shard(net, mp_policy=policy)
    return net


def unwrapped(net: nn.Module) -> nn.Module:
    """The module inside DDP (FSDP2 changes modules in place: there is nothing to unwrap)."""
    return getattr(net, "module", net)


@contextlib.contextmanager
def gradient_sync(net: nn.Module, ranks: Ranks, sync: bool):
    """Synchronise gradients in this backward only if sync (the window's last micro-batch)."""
    if ranks.mode == "ddp" and not sync:
        with net.no_sync():
            yield
    elif ranks.mode == "fsdp":
        net.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def all_sum(value: float, ranks: Ranks) -> float:
    """value summed over the ranks (fp64, so token counts and loss sums stay exact)."""
    if not ranks.on:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def rank_slice(window: list, ranks: Ranks, per_rank: int) -> list:
    """This rank's micro-batches of a window of ranks.world * per_rank of them (fewer in a short last window)."""
    return window[ranks.rank * per_rank : (ranks.rank + 1) * per_rank]


def full_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result: under FSDP a DTensor whose full value needs gathering."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ---- checkpoints ------------------------------------------------------------------------------------------
def save_state(folder: Path, net: nn.Module, optimizer, scaler, meta: dict, ranks: Ranks):
    """Write the trainable weights and optimizer state (DCP, sharded as they are), the scaler, meta (step, config)
    and each rank's RNG into a new folder, then swap it for `folder` once every rank is done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    fresh, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    if ranks.main:
        shutil.rmtree(fresh, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(net, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(fresh))
    torch.save({"rng_cpu": torch.get_rng_state(), "rng_cuda": _cuda_rng()}, fresh / f"rng_{ranks.rank}.pt")
    if ranks.main:
        torch.save(scaler.state_dict(), fresh / "scaler.pt")
        (fresh / "meta.json").write_text(json.dumps({**meta, "world": ranks.world, "mode": ranks.mode}))
    dist.barrier()
    if ranks.main:  # the old state stays whole until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: cannot read {folder / 'meta.json'} ({e}); run without --resume to start") from None


def load_state(folder: Path, net: nn.Module, optimizer, scaler, ranks: Ranks) -> dict:
    """Restore save_state's folder into net, optimizer and scaler (resharded to this number of ranks);
    returns its meta. The RNG comes back only when the number of ranks is the same."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    meta = read_meta(folder)
    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(net, optimizer, options=options)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    frozen_left_out = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights come from the base
    set_state_dict(
        net, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=frozen_left_out
    )
    scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    rng = folder / f"rng_{ranks.rank}.pt"
    if meta["world"] == ranks.world and rng.exists():
        saved = torch.load(rng, weights_only=True)
        torch.set_rng_state(saved["rng_cpu"])
        if saved["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng_cuda"])
    return meta


def full_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of net as plain CPU tensors, gathered from the shards (on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def _cuda_rng() -> list:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
