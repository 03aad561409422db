"""Config: every shipped preset loads, overrides apply, bad settings are refused with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import Config, load_config
from trainer.errors import UserError

PRESETS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_shipped_preset_loads(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.images_per_epoch % config.effective_train_batch == 0


def test_paper_preset_has_the_paper_settings():
    c = load_config("configs/spie-a100.yaml")
    assert c.model.pretrained == "timbrooks/instruct-pix2pix"
    assert c.model.use_lora and c.model.lora_rank == 8
    assert c.train.learning_rate == pytest.approx(3e-5)
    assert c.sample.eta == 1.0
    assert (c.sample.guidance_scale, c.sample.image_guidance_scale) == (7.5, 1.5)
    assert c.effective_train_batch == 256
    assert (c.train.beta, c.train.eps, c.train.score_alpha, c.train.rec_lambda) == (0.1, 0.1, 1.0, 0.5)
    assert c.train.objective == "spie_ranking"


def test_summary_prints_spie_sizes():
    c = load_config(
        "configs/tiny.yaml",
        [
            "sample.batch_size=4",
            "sample.nb_gen=2",
            "sample.num_batches_per_epoch=2",
            "train.batch_size=4",
            "train.gradient_accumulation_steps=2",
        ],
    )
    assert c.images_per_epoch == 16 and c.effective_train_batch == 8 and c.updates_per_epoch == 2
    assert "images per epoch = 16" in c.summary() and "gradient updates per epoch = 2" in c.summary()


def test_overrides_types_and_scientific_notation():
    c = load_config(
        "configs/tiny.yaml",
        ["train.learning_rate=1e-5", "run.num_epochs=7", "model.use_lora=false", "data.instructions=[a, b]"],
    )
    assert c.train.learning_rate == 1e-5 and c.run.num_epochs == 7 and c.model.use_lora is False
    assert c.data.instructions == ("a", "b")


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.lerning_rate=1e-5"], "unknown config key train.lerning_rate"),
        (["sampel.batch_size=2"], "unknown config key sampel"),
        (["train.learning_rate=fast"], "train.learning_rate: expected a number"),
        (["run.num_epochs=2.5"], "run.num_epochs: expected an integer"),
        (["model.scheduler=pndm"], "model.scheduler: 'pndm' is not one of"),
        (["train.batch_size=3"], "train.batch_size x train.gradient_accumulation_steps"),
        (
            ["train.objective=spie_ranking", "sample.nb_gen=1", "train.batch_size=2"],
            "sample.nb_gen must be >= 2",
        ),
        (
            ["train.objective=spie_ranking", "sample.nb_gen=4", "train.batch_size=2", "sample.batch_size=2"],
            "must be a multiple of sample.nb_gen",
        ),
        (["sample.eta=0"], "sample.eta must be > 0"),
        (["train.timestep_fraction=0"], "train.timestep_fraction"),
        (["model.resolution=30"], "model.resolution must be a multiple of 8"),
        (["data.source=folder"], "data.path is required"),
        (["train.learning_rate"], "expected KEY=VALUE"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(overrides, needle):
    with pytest.raises(UserError) as err:
        load_config("configs/tiny.yaml", overrides)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_unknown_yaml_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  num_epochs: 2\n  colour: blue\n")
    with pytest.raises(UserError, match="unknown config key run.colour"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad.write_text("run: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)


def test_presets_overlay_a_base(tmp_path):
    (tmp_path / "child.yaml").write_text(
        f"base: {Path('configs/tiny.yaml').resolve()}\ntrain:\n  learning_rate: 0.5\n"
    )
    c = load_config(tmp_path / "child.yaml")
    assert c.train.learning_rate == 0.5 and c.model.pretrained == "tiny"


def test_one_knob_for_learners_and_its_old_name():
    c = load_config("configs/spie-a100.yaml")
    assert c.ray.num_learners == 8 and c.data_parallel_size == 8 and c.images_per_epoch == 256
    # Without Ray one process samples and learns: more learners is a one-line error, not a silent 1.
    with pytest.raises(UserError, match=r"ray.num_learners=8 needs ray.enabled: true"):
        load_config("configs/spie-a100.yaml", ["ray.enabled=false"])
    # Run folders written before the rename still load; another value names the new field.
    assert load_config("configs/tiny.yaml", ["run.num_processes=1"]).data_parallel_size == 1
    with pytest.raises(UserError, match=r"run.num_processes: replaced by ray.num_learners"):
        load_config("configs/tiny.yaml", ["run.num_processes=4"])


def test_one_deadline_and_the_queue_settings_reach_the_client():
    from trainer.config.schema import DEFAULT_DEADLINE_S
    from trainer.rewards.queue import QueueClientConfig

    c = load_config("configs/tiny.yaml", ["reward.queue.resubmits=3", "reward.queue.encoding=png"])
    assert c.reward.deadline_s == QueueClientConfig().deadline_s == DEFAULT_DEADLINE_S
    assert (c.reward.queue.resubmits, c.reward.queue.encoding) == (3, "png")
    with pytest.raises(UserError, match=r"reward.queue.poll_s must be > 0"):
        load_config("configs/tiny.yaml", ["reward.queue.poll_s=0"])
    with pytest.raises(UserError, match=r"run.log_with: unknown tracker"):
        load_config("configs/tiny.yaml", ['run.log_with=["tensorbord"]'])


def test_overrides_apply_to_a_loaded_config_without_a_file():
    from trainer.config import with_overrides

    c = load_config("configs/tiny.yaml")
    d = with_overrides(c, ["train.learning_rate=1e-5", "sample.nb_gen=4"])
    assert (d.train.learning_rate, d.sample.nb_gen) == (1e-5, 4)
    assert d.train.learning_rate == 1e-5 and c.train.learning_rate != 1e-5
    with pytest.raises(UserError, match=r"sample.nb_gen"):
        with_overrides(c, ["sample.nb_gen=0"])
