"""The Python pipeline: the README snippet runs as written, and requests map to the right
conditions."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rqgen import RQPipeline
from rqgen.errors import ConfigError
from rqgen.stage2.guidance import PerSampleSeeds

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_snippet_runs(class_ar, tmp_path, monkeypatch):
    text = README.read_text()
    snippet = re.search(r"<!-- pipeline-snippet.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(snippet.replace('"demo_out/ar"', repr(str(class_ar))), scope)  # noqa: S102
    out, more = scope["out"], scope["more"]
    assert (tmp_path / "three.png").is_file()
    assert len(out.images) == 3 and out.images[0].size == (32, 32)
    assert out.names == ["3", "7", "5"] and len(more.images) == 8 and set(more.names) == {"7"}
    assert out.codes.shape == (3, 8, 8, 4) and out.pixels.shape == (3, 3, 32, 32)


def test_same_seed_same_images_and_bad_requests_are_one_line(class_ar):
    pipe = RQPipeline.from_pretrained(class_ar, device="cpu")
    assert pipe.classes[:3] == ["0", "1", "2"]
    a, b = pipe(class_labels=3, seed=4), pipe(class_labels="3", seed=4)
    assert torch.equal(a.pixels, b.pixels)
    balanced = pipe(num_images=20, seed=0)
    assert balanced.names == [str(i % 10) for i in range(20)]
    with pytest.raises(ConfigError, match=r"unknown class 'cat'.*0=0, 1=1"):
        pipe(class_labels=["cat"])
    with pytest.raises(ConfigError, match="not text-conditional"):
        pipe(prompt="a digit")
    with pytest.raises(ConfigError, match="num_images=0"):
        pipe(num_images=0)
    with pytest.raises(ConfigError, match="class 12 is not one of this model's 10 classes"):
        pipe(class_labels=[12])
    # id 10 indexes the null class: an off-by-one, refused; unconditional is asked for by name
    with pytest.raises(
        ConfigError, match=r"class 10 is not one.*unconditional samples: class none"
    ):
        pipe(class_labels=[10])
    free = pipe(class_labels=[None, "none"], seed=1)
    assert free.names == ["none", "none"]
    null = torch.full((2,), pipe.model.null_class)
    _, direct = pipe.sample(null, None, PerSampleSeeds([0, 1]))
    _, named = pipe.sample(pipe.conditions(["none", "none"])[0], None, PerSampleSeeds([0, 1]))
    assert torch.equal(direct, named)  # "none" is the model's null class


def test_diffusers_names_give_the_same_images_in_every_output_type(class_ar):
    pipe = RQPipeline.from_pretrained(class_ar, device="cpu")
    a = pipe(class_labels=[3, 7], num_images_per_prompt=2, generator=5)
    assert a.names == ["3", "3", "7", "7"] and len(a.images) == 4
    b = pipe(class_labels=[3, 3, 7, 7], seed=5)  # the seed alias, the same request spelled out
    assert torch.equal(a.pixels, b.pixels) and a.codes.tolist() == b.codes.tolist()
    g = torch.Generator().manual_seed(5)
    pt = pipe(class_labels=[3, 3, 7, 7], generator=g, output_type="pt")
    assert torch.equal(pt.images, (a.pixels + 1) / 2)
    arr = pipe(class_labels=[3, 3, 7, 7], generator=5, output_type="np").images
    assert arr.shape == (4, 32, 32, 3)
    assert np.array_equal(arr, pt.images.permute(0, 2, 3, 1).numpy())
    assert (np.asarray(a.images[0]) == np.asarray(b.images[0])).all()
    for bad, match in (
        (dict(output_type="latent"), "output_type='latent'"),
        (dict(num_images=2, num_images_per_prompt=2), "not both"),
        (dict(generator=torch.Generator(), seed=1), "not both"),
    ):
        with pytest.raises(ConfigError, match=match):
            pipe(class_labels=[3], **bad)


def test_a_class_error_names_ten_classes_at_most():
    from rqgen.pipeline import _class_id

    with pytest.raises(ConfigError) as e:
        _class_id(1000, [f"synset{i}" for i in range(1000)], 1000)
    assert "9=synset9, ... (1000 in all)" in str(e.value) and len(str(e.value)) < 300
    assert _class_id("none", ["cat", "none"], 2) == 1  # a class named "none" is that class
    assert _class_id("None", ["cat", "dog"], 2) == 2 and _class_id(None, ["cat", "dog"], 2) == 2
