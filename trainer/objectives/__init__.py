"""One module per objective, each a `trainer.objectives.base.Objective` registered by name
(`trainer.registry`): `ppo`, `spie_ranking`, `alignprop`, `spo`, `nft`. Nothing outside a module
names its objective; the loop, the learner and the config loader ask the registry."""
