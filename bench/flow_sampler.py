"""Flow sampler overhead: our SDE rollout with log-probs against diffusers' FluxKontextPipeline or
QwenImageEditPipeline.

Both run the same model, batch, resolution and steps in this process; the figure is the median over
`--runs` of (our time / pipeline time). Target: <= 1.10. `--model tiny-kontext` (default) builds the
seeded tiny Kontext, `--model tiny-qwen-edit` the tiny Qwen-Image-Edit (true CFG 4 on both sides,
the condition image at the edit's size on both sides: the pipeline's `calculate_dimensions` is
given that area, as in tests/sampler/test_qwen_edit.py); `--real-size` (Kontext) builds random
weights with FLUX.1 Kontext's transformer and VAE sizes (diffusers' default `FluxTransformer2DModel`
config with guidance embedding; throughput does not depend on the weights) and the tiny text
encoders (they run once per call on both sides), in bf16.

    python bench/flow_sampler.py [--model tiny-qwen-edit] [--batch 4] [--steps 10] [--resolution 16] [--runs 5]
    python bench/flow_sampler.py --real-size --resolution 512 --batch 4 --device cuda   # GPU only
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py: take the folder off sys.path so `import queue` finds the standard library.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from bench.interleaved import ratio_line, time_against_pipeline  # noqa: E402
from bench.paired import load_line  # noqa: E402


def real_size_folder(folder: Path) -> Path:
    """A FluxKontextPipeline folder with FLUX.1-sized random transformer and VAE (bf16)."""
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel

    from sampler.editors.tiny_kontext import build_tiny_kontext

    parts = build_tiny_kontext(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        parts["transformer"] = FluxTransformer2DModel(guidance_embeds=True).to(torch.bfloat16)
        parts["text_encoder"] = parts["text_encoder"].__class__(
            parts["text_encoder"].config.__class__(
                **{**parts["text_encoder"].config.to_dict(), "hidden_size": 768, "projection_dim": 768}
            )
        )
        t5 = parts["text_encoder_2"].config
        t5.d_model = 4096
        parts["text_encoder_2"] = parts["text_encoder_2"].__class__(t5)
        parts["vae"] = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        )
    FluxKontextPipeline(**parts).save_pretrained(folder)
    return folder


def kontext_pair(args, folder: Path):
    """Our Kontext policy and a function running FluxKontextPipeline on the same inputs."""
    from sampler.editors.kontext import KontextPolicy, load_kontext
    from sampler.editors.tiny_kontext import save_tiny_kontext

    if args.real_size:
        path = str(real_size_folder(folder))
    elif args.model == "tiny-kontext":
        path = str(save_tiny_kontext(folder, vae_warmup_steps=0))
    else:
        path = args.model
    dtype = torch.bfloat16 if args.real_size else torch.float32
    pipe = load_kontext(path, dtype=dtype).to(args.device)
    policy = KontextPolicy(pipe, args.steps, args.noise_level, resolution=args.resolution, device=args.device)
    res = args.resolution

    def theirs(sources, prompts):
        return pipe(
            image=sources, prompt=prompts, height=res, width=res, max_area=res * res, _auto_resize=False,
            num_inference_steps=args.steps, guidance_scale=policy.guidance_scale,
            max_sequence_length=policy.max_text_length, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    return policy, theirs


def qwen_pair(args, folder: Path):
    """Our Qwen-Image-Edit policy and a function running QwenImageEditPipeline on the same inputs."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module
    from PIL import Image

    from sampler.editors.qwen_edit import QwenEditPolicy, load_qwen_edit
    from sampler.editors.tiny_qwen_edit import save_tiny_qwen_edit

    path = (
        str(save_tiny_qwen_edit(folder, vae_warmup_steps=0)) if args.model == "tiny-qwen-edit" else args.model
    )
    pipe = load_qwen_edit(path).to(args.device)
    res = args.resolution
    policy = QwenEditPolicy(
        pipe, args.steps, args.noise_level, condition_area=res * res, max_text_length=1024, resolution=res,
        device=args.device,
    )  # fmt: skip
    original = module.calculate_dimensions
    module.calculate_dimensions = lambda area, ratio: original(res * res, ratio)

    def theirs(sources, prompts):
        pil = [Image.fromarray((s.permute(1, 2, 0) * 255).round().byte().numpy()) for s in sources]
        return pipe(
            image=pil, prompt=prompts, negative_prompt=[" "] * len(prompts), true_cfg_scale=4.0, height=res,
            width=res, num_inference_steps=args.steps, output_type="pt", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    return policy, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny-kontext", help='"tiny-kontext", "tiny-qwen-edit" or a local folder / hub id'
    )
    parser.add_argument("--real-size", action="store_true", help="random weights of FLUX.1 Kontext's sizes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(load_line("load before"))

    from sampler.editors import editor_family
    from sampler.scenes import shapes_batch

    tmp = tempfile.TemporaryDirectory()
    family = "flux_kontext" if args.real_size else editor_family(args.model)
    pair = qwen_pair if family == "qwen_image_edit" else kontext_pair
    policy, pipeline_call = pair(args, Path(tmp.name))
    res = args.resolution
    sources = torch.from_numpy(shapes_batch(0, args.batch, res)).permute(0, 3, 1, 2).float() / 255
    prompts = ["make it brighter"] * args.batch

    t_ours, t_theirs, ratios = time_against_pipeline(
        policy, sources, prompts, lambda: pipeline_call(sources, prompts), args.runs, args.device
    )
    name = "real-size random" if args.real_size else args.model
    print(f"device={args.device} model={name} batch={args.batch} steps={args.steps} resolution={res}")
    print(
        f"ours (SDE, log-probs): median {statistics.median(t_ours) * 1e3:.1f} ms, {args.batch / statistics.median(t_ours):.2f} images/s"
    )
    print(
        f"diffusers pipeline:    median {statistics.median(t_theirs) * 1e3:.1f} ms, {args.batch / statistics.median(t_theirs):.2f} images/s"
    )
    print(ratio_line(ratios))


if __name__ == "__main__":
    main()
    print(load_line("load after"))
