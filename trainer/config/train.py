"""The `train` section: the objective, its own settings, the optimizer and the update loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SPOConfig:
    """Step-by-step preference optimisation (`train.objective: spo`; defaults as RockeyCoss/SPO's
    configs/basic_config.py and its SD-1.5 preset spo_sd-v1-5_4k-prompts_num-sam-4_10ep_bs10.py)."""

    # Candidates x_{t-1} drawn from each x_t at a trained step (SPO's num_sample_each_step: 4).
    pool_size: int = 4
    # A pool gives a win/lose pair when softmax([best, worst]) differs by more than this (SPO's
    # compare_func threshold: 0.3). The values are the judge's raw scores x their `weight`, so scale
    # a scorer whose scores lie in [0, 1] with its weight.
    threshold: float = 0.3
    # The DPO-style coefficient on the clamped log-ratios to the reference (SPO's train.beta: 10).
    # The clamp is `train.eps` (SPO's train.eps: 0.1, as SPIE's).
    beta: float = 10.0
    # Denoising steps sampled plainly before the pools start (SPO's divert_start_step: 4 of 20).
    start_step: int = 4
    # What the judge sees of a candidate x_{t-1}: 1, its x0 prediction at the next step (SPO's input
    # to its step-aware preference model). Not in SPO: n > 1 carries each candidate to x_0 by n
    # deterministic DDIM moves spread over the remaining steps (n - 1 more UNet calls per
    # candidate), a lookahead for judges that read only clean images, whose verdict on an early,
    # blurred x0 prediction may not predict the final edit (bench/spo_judge.py measures it). On the
    # toy editor with the oracles as judge, 3 turned SPO's held-out success from -0.040 / -0.100 /
    # -0.045 into +0.095 / +0.095 / +0.085 (seeds 0 / 1 / 2, docs/learning.md). 1 stays the default:
    # SPO's own step-aware judge is trained on x0 predictions.
    judge_steps: int = 1


@dataclass(frozen=True)
class PPOSettings:
    """`train.objective: ppo` (and the group-normalised advantages nft shares)."""

    # PPO: clip range of the probability ratio.
    clip_range: float = 1e-4
    # PPO: advantages are clipped to [-adv_clip_max, adv_clip_max].
    adv_clip_max: float = 5.0
    # PPO: groups smaller than this use whole-batch statistics for normalisation.
    min_group_size: int = 2
    # PPO: how group-centred rewards are scaled. "group": by each group's std (GRPO, DDPO's
    # per-prompt tracker); "batch": by one std over the batch (Dr. GRPO), so groups whose edits
    # score alike (nothing to learn) weigh little instead of having their noise scaled to unit size.
    # Measured once only (demo, 20 epochs, seed 0): +0.025 [-0.005, +0.060] against "group"'s
    # +0.045, within noise; not judged on seeds 1 and 2, so "group" stays the default.
    advantage_scale: Literal["group", "batch"] = "group"


@dataclass(frozen=True)
class RankingSettings:
    """`train.objective: spie_ranking` (and the ratio clamp `eps` spo shares)."""

    # SPIE ranking: exponent applied to the clamped ratio (the KL coefficient of D3PO/DPO).
    beta: float = 0.1
    # SPIE ranking: the ratio to the reference is clamped to [1 - eps, 1 + eps].
    eps: float = 0.1
    # SPIE ranking: weight of the semantic score against the structural score.
    score_alpha: float = 1.0
    # SPIE: weight of the MSE reconstruction term outside the edit region.
    rec_lambda: float = 0.5


@dataclass(frozen=True)
class AlignPropSettings:
    """`train.objective: alignprop`."""

    # AlignProp: K, the last denoising steps backpropagated through (earlier steps run without a
    # graph), is drawn per sampling batch uniformly from [backprop_min_steps, backprop_max_steps];
    # equal ends give a fixed K, backprop_max_steps 0 means all sample.num_steps steps.
    backprop_min_steps: int = 1
    backprop_max_steps: int = 1
    # AlignProp: recompute each UNet call in the backward pass instead of storing its activations.
    gradient_checkpointing: bool = True
    # AlignProp's `loss_coeff`: the reward loss is scaled by it (theirs: 0.01 in every preset). Adam
    # undoes a constant scale, but gradient clipping (`max_grad_norm`) sees it, so the paper preset
    # sets 0.01; 1 (the default) leaves the loss -mean(weighted reward).
    alignprop_loss_coeff: float = 1.0


@dataclass(frozen=True)
class NFTSettings:
    """`train.objective: nft`."""

    # DiffusionNFT: the guidance strength beta of the implicit positive / negative policies
    # v+ = beta v + (1 - beta) v_old, v- = (1 + beta) v_old - beta v (their `config.beta`: 1.0 or 0.1).
    nft_beta: float = 1.0
    # DiffusionNFT's old policy (their `decay_type`, `return_decay`): after each epoch the old weights
    # become d old + (1 - d) current, d = 0 for 0 (the old policy is the one that sampled the batch),
    # min(0.001 step, 0.5) for 1 (their default: an average of recent weights), 75 flat steps then
    # min(0.0075 (step - 75), 0.999) for 2; step = optimizer steps so far. Rollouts still sample with
    # the current weights (upstream samples with the old ones).
    nft_decay_type: int = 0


@dataclass(frozen=True)
class TrainConfig(NFTSettings, AlignPropSettings, RankingSettings, PPOSettings):
    """The `train` section: the objective, the optimizer and the update loop. Each objective's own
    settings are one dataclass above (flat keys, `train.clip_range`, except SPO's `train.spo`);
    its checks are its `check` (`trainer.objectives.<name>`)."""

    # Objective, a name in `trainer.registry` (built-in or from a `spie.objectives` entry point):
    # "ppo" (DDPO PPO-clip on per-step ratios), "spie_ranking" (Plackett-Luce over
    # the nb_gen edits, D3PO-style clamped ratios to a frozen reference), "alignprop" (reward
    # backpropagation: sample with gradients, loss = minus the weighted differentiable reward; each
    # sampling batch is one backward pass, gradient_accumulation_steps of them one optimizer step),
    # "spo" (step-wise win/lose pairs from a pool of candidates per step, judged on their predicted
    # clean images; settings in `train.spo`; needs gradient_accumulation_steps 1 and, with Ray, one
    # learner), or "nft": DiffusionNFT (arXiv 2509.16117), likelihood-free, on the forward process from the
    # final latents and the group-normalised advantages.
    objective: str = "ppo"
    # Edits per training micro-batch, per process (a multiple of nb_gen for spie_ranking).
    batch_size: int = 2
    # Micro-batches accumulated per optimizer step.
    gradient_accumulation_steps: int = 1
    # AdamW learning rate.
    learning_rate: float = 3e-4
    # AdamW beta1.
    adam_beta1: float = 0.9
    # AdamW beta2.
    adam_beta2: float = 0.999
    # AdamW weight decay.
    adam_weight_decay: float = 1e-4
    # AdamW epsilon.
    adam_epsilon: float = 1e-8
    # Gradient-norm clipping threshold.
    max_grad_norm: float = 1.0
    # The learner's per-step denoiser calls (every objective but AlignProp, whose differentiable
    # sampling has its own `gradient_checkpointing`): recompute each UNet / transformer block in the
    # backward pass instead of keeping its activations (diffusers' `enable_gradient_checkpointing`;
    # sampling runs without gradients and is unaffected). Off by default: the tiny CPU presets do not
    # need it. The full-size presets that set it do not fit an 80 GB GPU without it (`spie train
    # --dry-run`, docs/gpu-plan.md): Kontext's learner step 50 GiB -> 5 GiB at micro-batch 4, 512 px.
    denoiser_checkpointing: bool = False
    # Passes over each epoch's samples.
    num_inner_epochs: int = 1
    # Fraction of the denoising steps trained on per trajectory (random subset each pass).
    timestep_fraction: float = 1.0
    # The last stochastic denoising steps left out of training (0: train on all). The per-step
    # log-prob's gradient scales with 1 / sigma_t, so the last, least noisy step's gradient is ~10x
    # the others' and sets the update's direction (cosine 0.96 with the total on the toy editor),
    # although that step only sharpens details: the early steps decide colour and layout.
    skip_final_steps: int = 0
    # Group filtering as in Edit-R1 (UniWorld-V2): before the update, drop the groups whose reward
    # (the single scorer's raw score, else the weighted sum of standardised scores) has a standard
    # deviation below `filter_min_std` (nothing to learn from), or a mean above `filter_max_mean`
    # (already solved). 0 and .inf keep every group.
    filter_min_std: float = 0.0
    filter_max_mean: float = float("inf")
    # Weight of a per-step KL penalty to the frozen reference (0: off). With nft: on the squared
    # difference of the network's outputs (velocities; DiffusionNFT's `config.train.beta`, 1e-4);
    # with a flow editor under ppo / spie_ranking: Flow-GRPO's, |mean - mean_ref|^2 / (2 std_t^2)
    # of the step's Gaussian means (its `train.beta`); with InstructPix2Pix: 0.5 (log-ratio)^2.
    kl_coef: float = 0.0
    # SPO's pools, threshold and beta (objective "spo").
    spo: SPOConfig = field(default_factory=SPOConfig)
