import pytest

from mimae_scale.config import CONFIG_DIR, Config, ConfigError, dump_yaml, grad_accumulation, load_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    # a classifier's config names no held-out shards of its own: the user's (or launcher's) setting does
    overrides = ["data.val_shards=/data/val"] if path.stem.startswith(("finetune", "linprobe")) else []
    cfg = load_config(path, overrides)
    assert isinstance(cfg, Config)
    assert load_config(path.stem, overrides) == cfg  # by name too


def test_shipped_config_contents():
    assert load_config("mae_vit_b16").mask.num_masks == 1
    assert load_config("mae_vit_b16").loss.w_max == 0 == load_config("mae_vit_b16").loss.w_min
    control = load_config("mae4_vit_b16")
    assert control.mask.num_masks == 4 and control.loss.w_max == 0 == control.loss.w_min
    large = load_config("mimae_vit_l16")
    assert (large.model.embed_dim, large.model.depth, large.model.num_heads) == (1024, 24, 16)
    huge = load_config("mimae_vit_h14")
    assert (huge.model.patch_size, huge.model.embed_dim, huge.model.depth) == (14, 1280, 32)
    assert huge.num_patches == 256


def test_defaults_are_the_spec():
    cfg = Config()
    assert (cfg.mask.num_masks, cfg.mask.ratio, cfg.mask.strategy) == (4, 0.75, "orthogonal")
    # w_min weights the per-dim mean CLUB estimate (chosen on the demo's validation split, docs/METHOD.md)
    assert cfg.mi.club.reduction == "mean"
    assert (cfg.loss.w_rec, cfg.loss.w_max, cfg.loss.w_min) == (1.0, 0.1, 0.1)
    assert cfg.mi.tau == 0.2 and cfg.mi.proj_hidden_dim == 2048 and cfg.mi.proj_dim == 256
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.base_lr == 1.5e-4
    assert cfg.train.global_batch == 4096 and cfg.engine.zero_stage == 1


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["optim.base_lr=1e-4", "mask.num_masks=2", "mi.club.level=global",
                               "optim.clip_grad=1.0", "data.crop_scale=[0.3, 0.9]", "deterministic=true"])
    assert cfg.optim.base_lr == 1e-4 and cfg.mask.num_masks == 2
    assert cfg.mi.club.level == "global" and cfg.optim.clip_grad == 1.0
    assert cfg.data.crop_scale == (0.3, 0.9) and cfg.deterministic is True
    assert cfg.model.embed_dim == 64  # the rest of the file still holds


def test_override_of_nested_section_keeps_siblings():
    cfg = load_config("tiny", ["mi.club.hidden_dim=32"])
    assert cfg.mi.club.global_size == 4 and cfg.mi.proj_dim == 32


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.embdim=3"], "model.embdim: unknown key"),
        (["nonsense=1"], "nonsense: unknown key"),
        (["model.depth=two"], "model.depth: expected an integer"),
        (["model.depth=2.5"], "model.depth: expected an integer"),
        (["deterministic=1"], "deterministic: expected true or false"),
        (["optim.base_lr=fast"], "optim.base_lr: expected a number"),
        (["mask.strategy=random"], "mask.strategy: must be one of"),
        (["mask.ratio=0.5"], "mask.strategy: orthogonal masks need K*(1-ratio) <= 1"),
        (["mask.ratio=1.5"], "mask.ratio"),
        (["train.micro_batch=24"], "train.global_batch: 64 is not a multiple of train.micro_batch 24"),
        (["mask.num_masks=1"], "loss.w_max: the InfoNCE term needs mask.num_masks >= 2"),
        (["model.patch_size=5"], "model.img_size: 32 is not a multiple of patch_size 5"),
        (["model.num_heads=3"], "model.num_heads: must divide embed_dim"),
        (["engine.zero_stage=4"], "engine.zero_stage"),
        (["data.crop_scale=[0.5]"], "data.crop_scale: expected a list of 2 values"),
        (["mi.tau=0"], "mi.tau: must be positive"),
        (["model=3"], "model: expected a mapping"),
        (["train.max_steps=0"], "train.max_steps"),
        (["model.depth"], "expected key.sub=value"),
    ],
)
def test_bad_overrides_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    assert field in str(info.value)


def test_bad_files_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: 2\n  widht: 3\n")
    with pytest.raises(ConfigError, match="model.widht: unknown key"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_batch_split_against_world_size():
    cfg = load_config("tiny")  # 64 images, micro-batch 32
    assert grad_accumulation(cfg, 1) == 2
    assert grad_accumulation(cfg, 2) == 1
    with pytest.raises(ConfigError, match="train.global_batch: 64 images do not split"):
        grad_accumulation(cfg, 3)


def test_dump_roundtrip(tmp_path):
    cfg = load_config("tiny", ["mi.tau=0.3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    assert cfg.fingerprint() == load_config(path).fingerprint()
    assert cfg.fingerprint() != load_config("tiny", ["mi.tau=0.4"]).fingerprint()
