import pytest


@pytest.fixture(scope="session")
def rqgen_cache(tmp_path_factory):
    """One RQGEN_CACHE for the session: the digit classifier is trained once, then reused."""
    return {"RQGEN_CACHE": str(tmp_path_factory.mktemp("rqgen_cache"))}
