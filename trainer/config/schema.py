"""Typed run configuration: one frozen dataclass per YAML section, a comment on every field.

A preset in `configs/` is a YAML file whose sections mirror the dataclasses; fields it does not name
keep their defaults. Each section has its module (`trainer.config.run`, `.model`, `.sample`,
`.train`, `.reward`, `.data`, `.ray`, `.eval`, `.sft`); this one gathers them into `Config`. Reading,
overrides and validation live in `trainer.config.loader`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.config.data import DataConfig
from trainer.config.eval import EvalConfig
from trainer.config.guard import GuardConfig
from trainer.config.model import ModelConfig
from trainer.config.ray import RayConfig
from trainer.config.reward import (
    DEFAULT_DEADLINE_S,
    GroundingConfig,
    GrpcRewardsConfig,
    QueueConfig,
    RewardConfig,
    ScorerConfig,
)
from trainer.config.run import RunConfig
from trainer.config.sample import SampleConfig
from trainer.config.sft import SFTConfig
from trainer.config.train import (
    AlignPropSettings,
    NFTSettings,
    PPOSettings,
    RankingSettings,
    SPOConfig,
    TrainConfig,
)
from trainer.registry import make_objective

__all__ = [
    "DEFAULT_DEADLINE_S",
    "AlignPropSettings",
    "Config",
    "DataConfig",
    "EvalConfig",
    "GuardConfig",
    "GroundingConfig",
    "GrpcRewardsConfig",
    "ModelConfig",
    "NFTSettings",
    "PPOSettings",
    "QueueConfig",
    "RankingSettings",
    "RayConfig",
    "RewardConfig",
    "RunConfig",
    "SFTConfig",
    "SPOConfig",
    "SampleConfig",
    "ScorerConfig",
    "TrainConfig",
]


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    # ---- derived sizes (SPIE prints these at start) ----
    @property
    def data_parallel_size(self) -> int:
        """Data-parallel training processes: `ray.num_learners` learner actors (1 without Ray)."""
        return self.ray.num_learners if self.ray.enabled else 1

    @property
    def batches_per_epoch(self) -> int:
        """Sampling batches drawn per epoch: `sample.num_batches_per_epoch` for each learner."""
        return self.sample.num_batches_per_epoch * self.data_parallel_size

    @property
    def images_per_epoch(self) -> int:
        s = self.sample
        return s.batch_size * s.nb_gen * s.num_batches_per_epoch * self.data_parallel_size

    @property
    def effective_train_batch(self) -> int:
        t = self.train
        return t.batch_size * t.gradient_accumulation_steps * self.data_parallel_size

    @property
    def updates_per_epoch(self) -> int:
        return self.images_per_epoch // self.effective_train_batch * self.train.num_inner_epochs

    @property
    def train_timesteps(self) -> int:
        return max(1, int(self.sample.num_steps * self.train.timestep_fraction))

    def summary(self) -> str:
        """The sizes line printed at start: the objective's own (`Objective.summary`), else this."""
        own = make_objective(self).summary()
        if own is not None:
            return own
        return (
            f"images per epoch = {self.images_per_epoch}, "
            f"effective train batch = {self.effective_train_batch}, "
            f"gradient updates per epoch = {self.updates_per_epoch}, "
            f"timesteps trained per trajectory = {self.train_timesteps}"
        )
