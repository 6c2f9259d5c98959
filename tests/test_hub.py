"""Models on the hub, without a network: loading from a cache laid out as huggingface_hub
lays it out (offline), and pushing through huggingface_hub's API with its HTTP layer
replaced by a recorder."""

import base64
import json
import shutil

import httpx
import pytest
import torch
from huggingface_hub import close_session, set_client_factory
from huggingface_hub.utils._http import default_client_factory

from rqgen import RQVAE, RQPipeline
from rqgen.errors import CheckpointError
from rqgen.hub import push

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo: str, files: dict) -> None:
    """models--org--name/{refs/main, blobs/, snapshots/COMMIT/...} with snapshot links."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    for name, src in files.items():
        blob = root / "blobs" / f"{abs(hash(name)):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, blob)
        link = root / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)


def _pushed_layout(ar):
    config = json.loads((ar / "config.json").read_text())
    vae = (ar / config["vae"]).resolve()
    return ar, vae, {**config, "vae": "vae"}


def test_a_cached_repository_samples_offline_and_a_missing_one_is_one_line(
    class_ar, tmp_path, monkeypatch
):
    ar, vae, config = _pushed_layout(class_ar)
    (tmp_path / "config.json").write_text(json.dumps(config))
    files = {
        "config.json": tmp_path / "config.json",
        "model.safetensors": ar / "model.safetensors",
        "vae/config.json": vae / "config.json",
        "vae/model.safetensors": vae / "model.safetensors",
    }
    _cache_repo(tmp_path / "cache", "org/digits", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = RQPipeline.from_pretrained(class_ar, device="cpu")(class_labels=[3, 7], seed=1)
    for name in ("org/digits", f"org/digits@{COMMIT}"):
        hub = RQPipeline.from_pretrained(name, device="cpu")(class_labels=[3, 7], seed=1)
        assert torch.equal(hub.pixels, local.pixels) and hub.names == local.names
    files = {n: vae / n for n in ("config.json", "model.safetensors")}
    _cache_repo(tmp_path / "cache", "org/digits-vae", files)  # a model class reads it too
    hub_vae, direct = RQVAE.from_pretrained("org/digits-vae"), RQVAE.from_pretrained(vae)
    for k, v in direct.state_dict().items():
        assert torch.equal(hub_vae.state_dict()[k], v)
    missing = r"org/missing: no such local directory, and not in the hub cache .*cache \(offline\)"
    with pytest.raises(CheckpointError, match=missing):
        RQPipeline.from_pretrained("org/missing", device="cpu")


def test_push_sends_the_model_with_its_vae_in_one_commit(class_ar, tmp_path, monkeypatch):
    sent: list[httpx.Request] = []

    def hub(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        path = request.url.path
        if path == "/api/validate-yaml":  # the card's metadata, checked before the commit
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if path == "/api/repos/create":
            return httpx.Response(200, json={"url": "https://huggingface.co/org/digits"})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in files
            ]})  # fmt: skip
        if path.endswith("/commit/main"):
            return httpx.Response(200, json={
                "commitUrl": f"https://huggingface.co/org/digits/commit/{COMMIT}",
                "commitOid": COMMIT, "success": True,
            })  # fmt: skip
        return httpx.Response(404, json={"error": f"unexpected {request.method} {path}"})

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub)))
    try:
        url = push(class_ar, "org/digits")
    finally:
        set_client_factory(default_client_factory)
        close_session()
    assert COMMIT in url
    commit = next(r for r in sent if r.url.path == "/api/models/org/digits/commit/main")
    lines = [json.loads(line) for line in commit.content.decode().splitlines()]
    files = {
        d["value"]["path"]: base64.b64decode(d["value"]["content"])
        for d in lines
        if d["key"] == "file"
    }
    ar, vae, config = _pushed_layout(class_ar)
    wanted = {"config.json", "model.safetensors", "README.md", "vae/config.json", "vae/README.md"}
    assert wanted <= set(files)
    assert not any(p.startswith(("train_state", "samples", "features")) for p in files)
    assert json.loads(files["config.json"]) == config  # the VAE found inside the repository
    assert files["model.safetensors"] == (ar / "model.safetensors").read_bytes()
    assert files["vae/model.safetensors"] == (vae / "model.safetensors").read_bytes()
    calls = [
        (r.method, r.url.path) for r in sent if r.url.path.startswith(("/api/repos", "/api/models"))
    ]
    assert ("POST", "/api/validate-yaml") in [(r.method, r.url.path) for r in sent]
    assert calls == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/models/org/digits/preupload/main"),
        ("POST", "/api/models/org/digits/commit/main"),
    ]
    assert all(
        r.headers["authorization"] == "Bearer hf_test" for r in sent if "/api/models" in str(r.url)
    )
