"""Tiny seeded Qwen-VL judges for tests (the scorers load them back through `from_pretrained`).

The tokenizer is word-level with Qwen's special tokens; like Qwen's BPE it writes every digit as its
own token ("10" -> "1", "0"), so the two-token rating path is exercised. The chat template is a
short Jinja template with the same image markup as Qwen2-VL / Qwen2.5-VL / Qwen3-VL's own
(`<|vision_start|><|image_pad|><|vision_end|>` per image, `<|im_start|>assistant\\n` to answer).
"""

from __future__ import annotations

from pathlib import Path

import yaml

SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from reward_servers.vlm_prompts import DEFAULT_PROMPTS

    prompts = yaml.safe_load(Path(DEFAULT_PROMPTS).read_text())
    texts = []

    def collect(node):
        if isinstance(node, dict):
            texts.extend(v for k, v in node.items() if k == "text")
            for v in node.values():
                collect(v)

    collect(prompts)
    words = ["<unk>", "<|endoftext|>", *SPECIAL_TOKENS, "Yes", "No", "user", "assistant"]
    words += [str(d) for d in range(10)]
    for text in texts:
        for ch in ".,?\"'()-{}":
            text = text.replace(ch, f" {ch} ")
        words += sorted(set(text.split()))
    words += ["make", "it", "snowy", "add", "a", "hat", "keep", "red", "blue", "sky", "\n", ":"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_vlm(folder: str, seed: int = 0, family: str = "qwen2_vl") -> str:
    """Save a tiny random `family` ("qwen2_vl", "qwen2_5_vl" or "qwen3_vl") judge to `folder`: text hidden 32 x 2
    layers, vision 32 x 1 layer, images fixed at 56 x 56 (Qwen2-VL: 14 px patches) or 64 x 64
    (Qwen3-VL: 16 px patches), so 4 merged tokens per image."""
    import torch
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1024,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": tokenizer.pad_token_id,
    }
    tokens = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text["bos_token_id"] = None
        vision = {"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2}
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        model_cls, side, patch = Qwen2VLForConditionalGeneration, 56, 14
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text["bos_token_id"] = None
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        model_cls, side, patch = Qwen2_5_VLForConditionalGeneration, 56, 14
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        text["head_dim"] = 16
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        }
        vision = {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        }
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        model_cls, side, patch = Qwen3VLForConditionalGeneration, 64, 16
    else:
        raise ValueError(f"family must be qwen2_vl, qwen2_5_vl or qwen3_vl, got {family!r}")
    torch.manual_seed(seed)
    model_cls(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(
        min_pixels=side * side, max_pixels=side * side, patch_size=patch
    ).save_pretrained(folder)
    return folder
