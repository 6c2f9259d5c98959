"""Stage 1: image tokenizers (RQ-VAE, DQ-VAE) and their training losses."""

from __future__ import annotations

from pathlib import Path

from rqgen.checkpoint import read_config
from rqgen.errors import CheckpointError
from rqgen.hub import resolve
from rqgen.stage1.dqvae import DQVAE
from rqgen.stage1.rqvae import RQVAE


def load_vae(directory: str | Path, map_location: str = "cpu", local_files_only: bool = False):
    """An RQ-VAE or DQ-VAE from a `save_pretrained` directory or a hub repository
    ('org/name[@revision]'), whichever it holds."""
    directory = resolve(directory, local_files_only)
    kind = read_config(directory).get("model_type")
    classes = {RQVAE.model_type: RQVAE, DQVAE.model_type: DQVAE}
    if kind not in classes:
        raise CheckpointError(
            f"'{directory}' holds a {kind!r} model, not an RQ-VAE or DQ-VAE: pass a stage-1 model"
        )
    return classes[kind].from_pretrained(directory, map_location=map_location)
