import pytest


@pytest.fixture(scope="session")
def rqgen_cache(tmp_path_factory):
    """One RQGEN_CACHE for the session: the digit classifier is trained once, then reused."""
    return {"RQGEN_CACHE": str(tmp_path_factory.mktemp("rqgen_cache"))}


@pytest.fixture(scope="session")
def vae(tmp_path_factory):
    """A tiny RQ-VAE trained 3 steps on the digits, shared by the stage-2 CLI tests."""
    from test_train_vae import TINY, rqgen

    out = tmp_path_factory.mktemp("ar") / "vae"
    rqgen("train-vae", "--data", "bundled:digits", "--out", out, "--steps", 3, "--device", "cpu",
          *TINY)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def class_ar(vae, tmp_path_factory):
    """One class-conditional transformer shared by the tests that only sample from it."""
    from test_train_ar import train_ar

    out = tmp_path_factory.mktemp("class_ar") / "ar"
    train_ar(vae, out, 4)
    return out
