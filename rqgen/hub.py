"""Models on the Hugging Face hub: `from_pretrained("org/name")` (or `"org/name@revision"`)
reads a repository through huggingface_hub's cache, and `push` uploads a model directory.

A local directory always wins over a repository of the same name. Offline
(`HF_HUB_OFFLINE=1`, or `local_files_only=True`) only the cache is read; a model missing
there is one line naming the repository and the cache. A transformer is pushed with the
VAE it records as its `vae/` folder, so one repository holds the pair.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import httpx
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from rqgen.errors import CheckpointError, RqgenError

# huggingface_hub raises the errors of the HTTP library it is built on (httpx; httpx2 in later
# releases): their base is the HTTPError among the bases of its own error
HTTP_ERRORS = (
    OSError,
    httpx.HTTPError,
    *(c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError"),
)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
BUNDLED = Path(__file__).resolve().parent / "bundled"  # models shipped in the package
FILES = ["*.json", "*.safetensors", "*.md", "vae/*"]  # what a model directory holds


def is_repo_id(name: str | os.PathLike) -> bool:
    """'org/name' or 'org/name@revision' that is not a local path."""
    text = str(name)
    return bool(REPO_ID.match(text)) and not Path(text).exists() and not text.startswith(".")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve(name: str | os.PathLike, local_files_only: bool = False) -> Path:
    """The local directory of a model: `name` itself, a model shipped in the package
    (`bundled:NAME`), or the cache snapshot of a hub repository (downloaded unless
    offline)."""
    if str(name).startswith("bundled:"):
        return bundled(str(name))
    if not is_repo_id(name):
        return Path(name)
    repo, _, revision = str(name).partition("@")
    cache = os.environ.get("HF_HUB_CACHE") or hub_constants.HF_HUB_CACHE
    try:
        path = snapshot_download(
            repo,
            revision=revision or None,
            allow_patterns=FILES,
            local_files_only=local_files_only or offline(),
            cache_dir=cache,
            library_name="rqgen",
        )
    except LocalEntryNotFoundError:
        how = "offline" if local_files_only or offline() else "the hub could not be reached"
        raise CheckpointError(
            f"{name}: no such local directory, and not in the hub cache {cache} ({how}): "
            "download it once online, or pass a local directory"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(
            f"{name}: no such local directory, nor a model on the hub ({type(e).__name__})"
        ) from None
    except HTTP_ERRORS as e:
        raise CheckpointError(f"{name}: reading it from the hub failed: {_first_line(e)}") from None
    return Path(path)


def bundled(name: str) -> Path:
    """bundled:NAME, a model shipped inside the package (benchmarks/bundled_models.py)."""
    path = BUNDLED / name.removeprefix("bundled:")
    if not (path / "config.json").is_file():
        have = sorted(
            f"bundled:{p.name}" for p in BUNDLED.glob("*") if (p / "config.json").is_file()
        )
        raise CheckpointError(
            f"{name} is not a model shipped with rqgen (there are: {', '.join(have) or 'none'})"
        )
    return path


def push(
    model_dir: str | Path,
    repo: str,
    private: bool = False,
    token: str | None = None,
    message: str | None = None,
) -> str:
    """Upload a model directory (a transformer with its VAE as `vae/`) to `repo`; returns
    the commit's URL."""
    model_dir = Path(model_dir)
    try:
        meta = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir} is not a model directory ({e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model"
        _stage(model_dir, staged)
        if "vae" in meta:  # the VAE travels with the transformer
            vae_dir = (model_dir / meta["vae"]).resolve()
            if not (vae_dir / "config.json").is_file():
                raise CheckpointError(f"{model_dir} records its VAE at {vae_dir}, which is gone")
            _stage(vae_dir, staged / "vae")
            (staged / "config.json").write_text(json.dumps({**meta, "vae": "vae"}, indent=2) + "\n")
        if offline():
            raise RqgenError(f"HF_HUB_OFFLINE is set: unset it to push {model_dir} to {repo}")
        api = HfApi(token=token)
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo,
                folder_path=staged,
                commit_message=message or f"Upload {meta.get('model_type', 'model')} with rqgen",
            )
        except (*HTTP_ERRORS, ValueError) as e:
            raise RqgenError(
                f"pushing {model_dir} to {repo} failed: {_first_line(e)} (log in with "
                "`hf auth login` or set HF_TOKEN; nothing was committed)"
            ) from None
    return str(info)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "README.md",
    "evaluations.json",
    "tokenizer.json",
)


def _stage(src: Path, dst: Path) -> None:
    """The files that make the model (MODEL_FILES): no training leftovers such as the train
    state, logs or the data listing, which names the user's files."""
    dst.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
