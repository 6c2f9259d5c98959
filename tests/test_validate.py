"""The config validation layer: every field of every config has a rule, every rule refuses
an out-of-range value in one line naming the field, and the CLI's numbers are checked the
same way before any work starts."""

import dataclasses

import pytest
from test_train_vae import rqgen

from rqgen.configs import (
    ARModelConfig,
    ARTrainConfig,
    VAETrainConfig,
    load_ar_experiment,
    load_vae_experiment,
)
from rqgen.configs.validate import RULES
from rqgen.errors import ConfigError
from rqgen.stage1.dqvae import DQVAEConfig
from rqgen.stage1.rqvae import RQVAEConfig

CONFIGS = [
    (load_vae_experiment, "tiny32", "model", RQVAEConfig),
    (load_vae_experiment, "tiny32", "train", VAETrainConfig),
    (load_vae_experiment, "dq-tiny32", "model", DQVAEConfig),
    (load_ar_experiment, "ar-tiny", "model", ARModelConfig),
    (load_ar_experiment, "ar-tiny", "train", ARTrainConfig),
]


def test_every_config_field_has_a_rule():
    for *_, cls in CONFIGS:
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == set(RULES[cls.__name__]), f"{cls.__name__}: fields without a rule"


def _as_override(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


CASES = [
    pytest.param(load, preset, section, f.name, id=f"{preset}-{section}.{f.name}")
    for load, preset, section, cls in CONFIGS
    for f in dataclasses.fields(cls)
]


@pytest.mark.parametrize("load,preset,section,name", CASES)
def test_an_out_of_range_value_is_refused_in_one_line(load, preset, section, name):
    rule = RULES[dict((c[2], c[3]) for c in CONFIGS if c[1] == preset)[section].__name__][name]
    bad = rule.bad_example()
    if bad is None:  # booleans and strings: a value of the wrong type
        bad = "maybe" if rule.kind == "bool" else "[1,2]"
    with pytest.raises(ConfigError) as e:
        load(preset, [f"{section}.{name}={_as_override(bad)}"])
    msg = str(e.value)
    assert "\n" not in msg and f"{section}.{name}" in msg, msg


@pytest.mark.parametrize("load,preset,overrides,expected", [
    (load_ar_experiment, "ar-tiny", ["model.width=100", "model.heads=8"],
     "model.width=100 must be divisible by model.heads=8"),
    (load_ar_experiment, "ar-tiny", ["model.depth_heads=3"], "model.depth_heads=3"),
    (load_vae_experiment, "tiny32", ["model.resolution=30"],
     "model.resolution=30 must be divisible by the downsampling factor 4"),
    (load_vae_experiment, "tiny32", ["model.attn_resolutions=[12]"], "[12] is not a resolution"),
    (load_vae_experiment, "tiny32", ["train.batch_size=10", "train.grad_accum=4"],
     "train.batch_size=10 must be divisible by train.grad_accum=4"),
    (load_vae_experiment, "dq-tiny32", ["model.decoder_ch_mult=[1,2,4,4]"], "needs 3 levels"),
    (load_vae_experiment, "tiny32", ["model.norm_groups=5"], "model.norm_groups=5 does not divide"),
    (load_vae_experiment, "tiny32", ["model.quantize_dropout=true",
     "model.quantize_dropout_depths=[1,8]"], "depths ≤ model.code_depth=4"),
    (load_vae_experiment, "tiny32", ["train.lr=nan"], "train.lr=nan: must be a number > 0"),
    (load_vae_experiment, "tiny32", ["model.codebook_size=0"],
     "model.codebook_size=0: must be an integer ≥ 2"),
])  # fmt: skip
def test_relations_between_fields(load, preset, overrides, expected):
    with pytest.raises(ConfigError, match=__import__("re").escape(expected)):
        load(preset, overrides)


@pytest.mark.parametrize("args,expected", [
    (["train-vae", "--data", "bundled:digits", "--steps", "-5"], "--steps: -5: must be an"),
    (["train-vae", "--data", "bundled:digits", "--steps", "0"], "must be an integer ≥ 1"),
    (["train-vae", "--data", "bundled:digits", "train.batch_size=0"], "train.batch_size=0"),
    (["sample", "--model", "M", "--n", "0"], "--n: 0: must be an integer ≥ 1"),
    (["sample", "--model", "M", "--batch-size", "-1"], "must be an integer ≥ 1"),
    (["sample", "--model", "M", "--top-k", "0"], "--top-k: 0: must be an integer ≥ 1"),
    (["sample", "--model", "M", "--top-k", "16,0"], "must be an integer ≥ 1"),
    (["sample", "--model", "M", "--top-p", "1.5"], "must be a number > 0 and ≤ 1"),
    (["sample", "--model", "M", "--temperature", "-1"], "must be a number > 0"),
    (["sample", "--model", "M", "--temperature", "inf"], "must be a number > 0"),
    (["sample", "--model", "M", "--accept", "0"], "must be a number > 0 and ≤ 1"),
    (["sample", "--model", "M", "--n", "many"], "'many': must be an integer ≥ 1"),
    (["plan", "--config", "ar-tiny", "--gpus", "0", "--gpu-mem", "80"], "must be an integer ≥ 1"),
    (["eval-gen", "--model", "M", "--ref", "R", "--n", "0"], "must be an integer ≥ 1"),
])  # fmt: skip
def test_cli_numbers_are_refused_in_one_line_before_any_work(tmp_path, args, expected):
    out = tmp_path / "out"
    r = rqgen(*args, "--out", out, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_version_and_defaults_in_help():
    from rqgen import __version__

    assert rqgen("--version").stdout.strip() == f"rqgen {__version__}"
    text = " ".join(rqgen("sample", "--help").stdout.split())  # unwrapped
    assert "(default: 16)" in text and "(default: auto)" in text and "(default: 0)" in text


@pytest.mark.parametrize("vae, ar, vae_m, ar_m", [("rq64", "ar-64", 6.6, 51.8),
                                                  ("rq128", "ar-128", 71.9, 143.8)])  # fmt: skip
def test_consumer_gpu_presets_give_8x8x4_codes_at_their_documented_sizes(vae, ar, vae_m, ar_m):
    import torch

    from rqgen.configs import ar_transformer_config
    from rqgen.stage1.rqvae import RQVAE
    from rqgen.train.plan import count_params

    exp = load_vae_experiment(vae)
    model = RQVAE(exp.model).eval()
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(vae_m, abs=0.05)
    r = exp.model.resolution
    with torch.no_grad():
        codes = model.encode_to_codes(torch.zeros(1, 3, r, r))
    assert tuple(codes.shape[1:]) == (8, 8, 4)
    a = load_ar_experiment(ar)
    cfg = ar_transformer_config(a.model, exp.model.codebook_size, [8, 8, 4],
                                exp.model.embed_dim, num_classes=10)  # fmt: skip
    assert count_params(cfg)[0] / 1e6 == pytest.approx(ar_m, abs=0.05)
