"""Qwen2.5-VL's processor for the Qwen-Image-Edit pipeline, with or without a video processor.

transformers 5 builds `Qwen2VLProcessor` with a video processor, and its video processors need
torchvision; the edit pipeline passes images only (`QwenImageEditPipeline._get_qwen_prompt_embeds`
calls `processor(text=..., images=..., padding=True)`). `load_processor` takes the ordinary path
(`Qwen2VLProcessor.from_pretrained(..., subfolder="processor")`) and, where that fails for want of a
video processor, builds the same processor from the folder's tokenizer and image processor (the
PIL backend) without one.
"""

from __future__ import annotations

from transformers import Qwen2VLProcessor


class ImagesOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` that accepts no video processor (images and text only)."""

    def __init__(
        self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs
    ):
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kwargs)

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the tokenizer and image processor (what `load_processor` reads back)."""
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        return [str(save_directory)]


def load_processor(pretrained: str, revision: str | None = None, subfolder: str = "processor"):
    """The Qwen2.5-VL processor of a Qwen-Image-Edit folder or hub id (`subfolder`)."""
    kwargs = {"subfolder": subfolder, **({"revision": revision} if revision else {})}
    try:
        return Qwen2VLProcessor.from_pretrained(pretrained, **kwargs)
    except (ImportError, AttributeError, TypeError, ValueError):  # no torchvision: no video processor
        from transformers import Qwen2Tokenizer
        from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

        return ImagesOnlyQwen2VLProcessor(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(pretrained, **kwargs),
            tokenizer=Qwen2Tokenizer.from_pretrained(pretrained, **kwargs),
        )
