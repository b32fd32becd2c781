"""The same measurement on the standard stack: Hugging Face transformers + peft (`--compare hf` only).

    python -m project.bench.finetune.hf_child SPEC.json RESULT.json

Same weights (the parent saves them once in Hugging Face layout), same examples, same autocast, same
optimizer and GradScaler (project/train.py's), same timing and meters (child.py). What differs is the
model code: `LlamaForCausalLM` with its own loss, `gradient_checkpointing_enable()` (non-reentrant),
peft's LoRA. This is the only module that imports transformers or peft, and only in this process.
"""

from __future__ import annotations

import torch

from llama.errors import UserError
from project.bench.finetune.child import Spec, Stack, main
from project.distributed import Ranks

# Meta projection names -> Hugging Face module names.
HF_TARGETS = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
}


def hf_stack(spec: Spec, device: torch.device, ranks: Ranks) -> Stack:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaModel

    from project.train import TrainConfig, autocast, make_optimizer, make_scaler, optimizer_update

    if ranks.on:
        raise UserError("the Hugging Face stack is measured in one process")
    model = LlamaForCausalLM.from_pretrained(spec.hf_dir, dtype=torch.float32).to(device)
    model.config.use_cache = False  # training: no KV cache
    if spec.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(spec.source.seed)
    if spec.lora:
        config = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            bias="none",
            target_modules=[HF_TARGETS[t] for t in spec.lora.targets],
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    else:
        model.requires_grad_(True)
    model.train()
    cfg = TrainConfig(lr=spec.lr, optimizer=spec.optimizer, grad_accum=spec.grad_accum, precision=spec.precision)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scaler = make_scaler(device, spec.precision)

    def micro_batch(input_ids, labels, n_labels, sync):
        # num_items_in_batch: HF sums the token losses and divides by the window's label tokens, as train.py does.
        with autocast(device, spec.precision):
            loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=n_labels).loss
        scaler.scale(loss).backward()
        return loss.item()

    decoder = next(m for m in model.modules() if isinstance(m, LlamaModel))
    lm_head = next(m for name, m in model.named_modules() if name.endswith("lm_head"))
    return Stack(model, micro_batch, lambda: optimizer_update(optimizer, scaler)[0], optimizer, decoder, lm_head)


if __name__ == "__main__":
    main(build=hf_stack)
