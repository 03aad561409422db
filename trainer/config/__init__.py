"""The run configuration: one module per YAML section (`run`, `model`, `sample`, `train`, `reward`,
`data`, `ray`, `eval`, `sft`), gathered into `Config` by `schema`; `loader` reads presets, applies
`--set` overrides and validates (each objective's own checks through `trainer.registry`)."""

from trainer.config.loader import dump_config, load_config, to_dict, validate, with_overrides
from trainer.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    GuardConfig,
    ModelConfig,
    RayConfig,
    RewardConfig,
    RunConfig,
    SampleConfig,
    ScorerConfig,
    SFTConfig,
    SPOConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "GuardConfig",
    "ModelConfig",
    "RayConfig",
    "RewardConfig",
    "RunConfig",
    "SFTConfig",
    "SPOConfig",
    "SampleConfig",
    "ScorerConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
    "to_dict",
    "validate",
    "with_overrides",
]
