"""A seeded tiny Qwen-Image-Edit, built from small configs with no network access.

The sizes follow diffusers' own test (`tests/pipelines/qwenimage/test_qwenimage_edit.py`,
`get_dummy_components`: a 2-block `QwenImageTransformer2DModel` with 3 heads of 16, a 4-channel
`AutoencoderKLQwenImage`, a Qwen2.5-VL of width 16 with a 2-block vision tower), except that the VAE
has Qwen-Image's three downsamplings (8 px per latent, as the real one) so that the pipeline's
~1 Mpx condition image makes 4096 tokens, not 16384, and the scheduler is Qwen-Image's (dynamic,
exponential shift). The VAE is warmed up on synthetic scenes (`sampler.tiny.fit_vae`, one frame of
the video VAE) and its `latents_mean` / `latents_std` are set per channel from its latents, as
Qwen-Image's are; without that its decodes barely depend on the latents and nothing learns
brightness. The tokenizer is made locally: a byte-level BPE (`Qwen2Tokenizer`, Qwen's
pre-tokenizer) whose merges make every word of the pipeline's prompt template one token, as Qwen's
151k vocabulary does, so the template's system part is 64 tokens and the pipeline's
`prompt_template_encode_start_idx` (64) drops exactly it; the special tokens (`<|im_start|>`,
`<|vision_start|>`, `<|image_pad|>`, ...) get their own ids, which the Qwen2.5-VL config names.
The image processor is `Qwen2VLImageProcessor` with at most 56 x 56 pixels (4 vision tokens).
Saved with `save_pretrained` as a `QwenImageEditPipeline`, so it loads back through the same
`from_pretrained` path as `Qwen/Qwen-Image-Edit`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Words the tokenizer keeps whole beside the template's: the instructions of the synthetic data.
EXTRA_WORDS = (
    "make it brighter darker red green blue yellow white black remove add the a an square circle "
    "triangle background object colour color bigger smaller turn into change to of and with"
)
_TEMPLATE_TEXT = (
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. "
    "Generate a new image that meets the user's requirements while maintaining consistency with the "
    "original input where appropriate.\nuser\nassistant\n"
)


def tiny_qwen_tokenizer():
    """A `Qwen2Tokenizer` over a byte-level BPE trained locally on the template and instruction words."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = "\n".join([_TEMPLATE_TEXT, EXTRA_WORDS, EXTRA_WORDS.title(), *EXTRA_WORDS.split()])
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([words] * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=state["vocab"], merges=merges, model_max_length=1024, extra_special_tokens=SPECIAL_TOKENS[1:]
    )
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tok


def build_tiny_qwen_edit(seed: int = 0) -> dict:
    """Seeded tiny Qwen-Image-Edit components (the `QwenImageEditPipeline` constructor's arguments)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from sampler.editors.qwen_processor import ImagesOnlyQwen2VLProcessor

    tokenizer = tiny_qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,  # 4 latent channels x a 2 x 2 patch
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(seed + 1)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    torch.manual_seed(seed + 2)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        hidden_size=16,
        vocab_size=len(tokenizer),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = ImagesOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # Qwen/Qwen-Image's scheduler_config.json: resolution-dependent exponential shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=8192,
        max_shift=0.9,
        shift=1.0,
        shift_terminal=0.02,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": processor,
        "transformer": transformer,
    }


def template_prefix_tokens(tokenizer, template: str) -> int:
    """How many tokens the template's part before the user turn takes (the pipeline drops 64)."""
    prefix = re.split(r"(<\|vision_start\|>)", template)[0]
    return len(tokenizer(prefix)["input_ids"])


class _SingleFrame(torch.nn.Module):
    """The video VAE seen as an image VAE ((B, 3, H, W) in and out), for `sampler.tiny.fit_vae`."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def encode(self, x: torch.Tensor):
        return self.vae.encode(x.unsqueeze(2))

    def decode(self, z: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.vae.decode(z).sample[:, :, 0])


def _warm_up_and_normalise(vae, seed: int, steps: int) -> float:
    """Fit the VAE to seeded scenes (as the tiny InstructPix2Pix's and Kontext's), then set
    `latents_mean` / `latents_std` to its latents' per-channel statistics, as Qwen-Image's are."""
    from sampler.scenes import shapes_batch
    from sampler.tiny import warm_up_vae

    loss = warm_up_vae(_SingleFrame(vae), seed, steps)
    scenes = torch.from_numpy(shapes_batch(seed + 7, 128, 32)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(scenes.unsqueeze(2)).latent_dist.mode()
    dims = (0, 2, 3, 4)
    vae.register_to_config(
        latents_mean=[float(v) for v in z.mean(dim=dims)], latents_std=[float(v) for v in z.std(dim=dims)]
    )
    return loss


def save_tiny_qwen_edit(path: str | Path, seed: int = 0, vae_warmup_steps: int = 200) -> Path:
    """Build the tiny Qwen-Image-Edit, warm up and normalise its VAE, and save it (idempotent per recipe)."""
    from diffusers import QwenImageEditPipeline

    from sampler.tiny import TINY_MARKER, built_with

    path = Path(path)
    # 200 steps of 32 scenes, as the other tiny VAEs (100 of 16 gave a seed-0 paired gain of +0.0097
    # in the learning test instead of +0.0376).
    recipe = {"family": "qwen_image_edit", "seed": seed, "vae_warmup_steps": vae_warmup_steps}
    if built_with(path, recipe):
        return path
    path.mkdir(parents=True, exist_ok=True)
    components = build_tiny_qwen_edit(seed)
    if vae_warmup_steps > 0:
        recipe["vae_reconstruction_loss"] = _warm_up_and_normalise(components["vae"], seed, vae_warmup_steps)
    QwenImageEditPipeline(**components).save_pretrained(path, safe_serialization=True)
    # Name the processor as Qwen/Qwen-Image-Edit's model_index.json does (`load_processor` reads it).
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    (path / TINY_MARKER).write_text(json.dumps(recipe))
    return path
