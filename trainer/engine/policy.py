"""Building the policy from config, and the one checked way to put trained weights into it.

`build_policy` loads the base model (a local folder, a hub id, or `tiny`), adds exemplar parts and
LoRA adapters per config; `load_trainable_into_policy` copies a run's trained tensors in, refusing
missing or mis-shaped ones. Train, generate, evaluate and Ray workers all go through these.
"""

from __future__ import annotations

import torch

from sampler.editors import TINY_FAMILIES, editor_family, load_editor
from sampler.exemplar import ExemplarPreconv, expand_conv_in
from sampler.models import hub_problem
from sampler.policy import EditPolicy
from trainer.config import Config
from trainer.engine.lora import add_lora, lora_targets
from trainer.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={name} but no CUDA device is available")
    return torch.device(name)


def check_models(config: Config) -> None:
    """Fail in one line, before anything starts, when a model the run names cannot be had: the editor
    (`model.pretrained`) and each scorer's `model_id` (`sampler.models.hub_problem`)."""
    names = (
        [("model.pretrained", config.model.pretrained)]
        if config.model.pretrained not in TINY_FAMILIES
        else []
    )
    for s in config.reward.scorers:
        if isinstance(s.kwargs.get("model_id"), str):
            names.append((f"reward scorer {s.name}", s.kwargs["model_id"]))
    for where, name in names:
        problem = hub_problem(name, config.model.revision if where == "model.pretrained" else None)
        if problem:
            raise UserError(f"{where}: {problem}")


def build_policy(config: Config, device: torch.device | None = None) -> EditPolicy:
    """Load the base model and wrap it for sampling; adds LoRA adapters and exemplar parts per config.

    `model.editor` (or the model's `model_index.json`) picks the family, whose editor module
    (`sampler.editors.load_editor`) gives the loader and the LoRA targets: the UNet editors here, the
    flow-matching ones in `trainer.engine.flow_policy`."""
    m = config.model
    if m.pretrained not in TINY_FAMILIES:
        problem = hub_problem(m.pretrained, m.revision)
        if problem:
            raise UserError(problem)
    try:
        family = editor_family(m.pretrained, m.editor, m.revision)
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained: {str(err).splitlines()[0]}") from err
    try:
        editor = load_editor(family)
    except ValueError as err:
        raise UserError(str(err)) from err
    if editor.FLOW_MATCHING:
        from trainer.engine.flow_policy import build_flow_policy

        return build_flow_policy(config, editor, device or resolve_device(config.run.device))
    path = (
        editor.tiny_model(m.tiny_dir, config.run.seed) if m.pretrained == editor.TINY_NAME else m.pretrained
    )
    try:
        components = editor.load(path, m.revision, m.scheduler)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.pretrained: cannot load {m.pretrained!r}: {str(err).splitlines()[0]}"
        ) from err
    return wrap_policy(config, editor, components, device or resolve_device(config.run.device))


def wrap_policy(config: Config, editor, components, device: torch.device) -> EditPolicy:
    """The InstructPix2Pix policy of loaded components, with exemplar parts and LoRA per config (also
    what `spie train --dry-run` runs on components built on the meta device)."""
    m, s = config.model, config.sample
    exemplar = None
    if m.exemplar_conditioning:
        expand_conv_in(components.unet, 4)
        torch.manual_seed(config.run.seed)
        text_dim = components.text_encoder.config.hidden_size
        heads = 8 if text_dim % 8 == 0 else 1
        exemplar = ExemplarPreconv(
            text_dim=text_dim, inner_dim=max(heads * 8, 320 if text_dim >= 320 else text_dim), heads=heads
        )
    if m.use_lora:
        add_lora(components.unet, config, lora_targets(config, editor))
    if config.train.denoiser_checkpointing:
        components.unet.enable_gradient_checkpointing()
    return EditPolicy(
        components,
        scheduler=m.scheduler,
        num_steps=s.num_steps,
        eta=s.eta,
        guidance_scale=s.guidance_scale,
        image_guidance_scale=s.image_guidance_scale,
        exemplar_guidance_scale=s.exemplar_guidance_scale,
        exemplar=exemplar,
        device=device,
    )


def trainable_parameters(policy: EditPolicy, use_lora: bool) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of everything the optimizer updates (marks them requires_grad)."""
    params: dict[str, torch.nn.Parameter] = {}
    for name, p in policy.denoiser.named_parameters():
        keep = ("lora_" in name) if use_lora else True
        if policy.exemplar is not None and name.startswith("conv_in."):
            keep = True
        if keep:
            p.requires_grad_(True)
            params[f"{policy.denoiser_name}.{name}"] = p
    if policy.exemplar is not None:
        for name, p in policy.exemplar.named_parameters():
            p.requires_grad_(True)
            params[f"exemplar.{name}"] = p
    if not params:
        raise UserError("model: nothing to train (no LoRA parameters found)")
    return params


def load_trainable_into_policy(policy: EditPolicy, state: dict[str, torch.Tensor], use_lora: bool) -> None:
    """Copy trained weights into a policy that does not train (generation, rollout workers)."""
    params = trainable_parameters(policy, use_lora)
    with torch.no_grad():
        for name, p in params.items():
            if name not in state:
                raise UserError(f"checkpoint lacks trained weight {name}")
            p.copy_(state[name].to(p.device, p.dtype))
            p.requires_grad_(False)


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # where the editors keep them (`policy.c`)


class DroppedTextEncoder(torch.nn.Module):
    """Stands in for a text encoder a learner dropped: no weights, and one clear line if called."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.name} was dropped from this learner (it trains on the embeddings recorded in the "
            "rollout; an objective whose learner reads instructions sets learner_reads_text)"
        )


def drop_text_encoders(policy) -> int:
    """Free a learner's text encoders (CLIP, T5, Qwen2.5-VL): a learner that trains on rollouts reads
    the embeddings they recorded, never an instruction. The InstructPix2Pix policy's empty-prompt
    embeddings (the null branch of its guidance) are computed first and kept. Returns the bytes
    freed (9.1 GiB on FLUX.1 Kontext in bf16, 15.4 GiB on Qwen-Image-Edit)."""
    if hasattr(policy, "null_embeds"):
        policy.null_embeds(1)
    freed = 0
    for name in TEXT_ENCODERS:
        module = getattr(policy.c, name, None)
        if module is None or isinstance(module, DroppedTextEncoder):
            continue
        tensors = [*module.parameters(), *module.buffers()]
        freed += sum(t.numel() * t.element_size() for t in tensors)
        setattr(policy.c, name, DroppedTextEncoder(name))
    if freed and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed
