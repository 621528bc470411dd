"""LoRA fine-tuning with peft: adapters on the block matrices, everything else frozen.

`azgpt finetune --lora` hands the training loop a model hook (`lora_hook`) that injects peft's
LoRA layers (`peft.inject_adapter_in_model`) into the base model after its weights are loaded.
Only the adapters train. Each checkpoint then holds:

- `model.safetensors`: the merged weights (base + B @ A * alpha / r), so `sample`, `eval`,
  `export`, `serve` and `chat` load a LoRA checkpoint like any other, and an export is merged;
- the adapter itself (`lora.*` tensors in `optimizer.safetensors`, beside the optimizer state
  that resuming needs), and in `meta.json` under `lora`: the base checkpoint's path and the
  sha256 of its `model.safetensors`, rank, alpha, dropout and target modules.

Resuming reloads the base's weights (refusing a base whose sha256 changed, in one sentence),
injects the adapters and loads them back, so a resumed run continues exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .fsutil import sha256_file

PREFIX = "lora."


def _need_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError(
            "--lora needs peft, which is not installed; run `pip install azgpt[lora]`."
        ) from None


def target_names(model, spec: str) -> list[str]:
    """Names of the Linear modules matching `spec`'s comma-separated suffixes (never lm_head)."""
    wanted = [t.strip() for t in spec.split(",") if t.strip()]
    out = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
        and name != "lm_head"
        and any(name == t or name.endswith("." + t) for t in wanted)
    ]
    if not out:
        raise UserError(
            f"sft.lora_targets={spec!r} names no Linear module of this model; use names such as "
            "c_attn, c_q, c_v, attn.c_proj, c_fc, mlp.c_proj."
        )
    return out


def merged_state(model) -> dict[str, torch.Tensor]:
    """The plain GPT state dict of a model with LoRA layers: each adapted weight plus its delta,
    adapter tensors left out, names as without peft (a tied lm_head left out, as checkpoints do)."""
    from peft.tuners.lora import LoraLayer

    from .checkpoint import TIED, tied

    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            w = mod.base_layer.weight.detach() + mod.get_delta_weight("default").detach()
            sd[f"{name}.weight"] = w
            if mod.base_layer.bias is not None:
                sd[f"{name}.bias"] = mod.base_layer.bias.detach()
    for k, v in model.state_dict().items():
        if "lora_" in k or ".base_layer." in k:
            continue
        sd[k] = v.detach()
    if tied(model.config):
        sd.pop(TIED, None)
    return {k: v.contiguous().cpu().clone() for k, v in sd.items()}


def adapter_state(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return {PREFIX + k: v.detach().contiguous().cpu().clone() for k, v in sd.items()}


def lora_info(sft, base: Path) -> dict:
    return {
        "base": str(base.resolve()),
        "base_sha256": sha256_file(base / "model.safetensors"),
        "r": sft.lora_r,
        "alpha": sft.lora_alpha,
        "dropout": sft.lora_dropout,
        "targets": sft.lora_targets,
    }


def inject(model, sft):
    """Add LoRA layers to `model` in place (base weights frozen); returns the trainable count."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=sft.lora_r,
        lora_alpha=sft.lora_alpha,
        lora_dropout=sft.lora_dropout,
        target_modules=target_names(model, sft.lora_targets),
    )
    inject_adapter_in_model(cfg, model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_hook(sft, base: Path, info: dict):
    """The model hook for the training loop (see module docstring)."""
    _need_peft()

    def hook(model, resume_ckpt: Path | None):
        from .checkpoint import load_tensors, load_weights, read_json

        if resume_ckpt is not None:
            saved = read_json(resume_ckpt / "meta.json", "use another checkpoint.").get("lora")
            if not saved:
                raise UserError(
                    f"{resume_ckpt} is not a LoRA checkpoint; resume it without --lora."
                )
            if sha256_file(base / "model.safetensors") != saved.get("base_sha256"):
                raise UserError(
                    f"the adapter in {resume_ckpt} was trained on another base than {base} "
                    "(sha256 of model.safetensors differs); resume with the base it was trained on."
                )
            load_weights(model, base / "model.safetensors")  # the base, not the merged weights
        n = inject(model, sft)
        if resume_ckpt is not None:
            from peft import set_peft_model_state_dict

            tensors = load_tensors(resume_ckpt / "optimizer.safetensors")
            adapter = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
            set_peft_model_state_dict(model, adapter)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA: {n:,} trainable parameters of {total:,} ({100 * n / total:.2f}%)")
        # What the loop saves: merged weights as model.safetensors, the adapter beside them.
        model.checkpoint_state = lambda: (merged_state(model), adapter_state(model))
        return model

    return hook
