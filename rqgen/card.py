"""Model cards: the README.md of every model directory, generated from what the directory
records (config.json, and evaluations.json once a model has been scored), never edited by
hand. The YAML header is the hub's metadata; the body says what the model is, how it was
trained, how well it does under which protocol, and how to load it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from rqgen.errors import CheckpointError
from rqgen.utils.files import atomic_write

CARD_NAME = "README.md"
EVALUATIONS_NAME = "evaluations.json"
KINDS = {  # model_type: (name, stage, tags)
    "rqvae": ("RQ-VAE", "stage 1: image tokenizer", ["rq-vae", "image-tokenizer"]),
    "dqvae": ("DQ-VAE", "stage 1: image tokenizer", ["dq-vae", "image-tokenizer"]),
    "rq_transformer": ("RQ-Transformer", "stage 2: image generator", ["rq-transformer"]),
    "dq_transformer": ("DQ-Transformer", "stage 2: image generator", ["dq-transformer"]),
}


_COMMAND: list[str] | None = None  # set by the `rqgen` command itself


def running_command(argv: list[str]) -> None:
    global _COMMAND
    _COMMAND = [str(a) for a in argv]


def command() -> str:
    """The command line that is running, as a user would retype it."""
    if _COMMAND is not None:
        return shlex.join(["rqgen", *_COMMAND])
    argv = sys.argv[1:]
    launcher = Path(sys.argv[0]).name if sys.argv else ""
    if launcher in ("rqgen", "__main__.py") or launcher.endswith("rqgen"):
        return shlex.join(["rqgen", *argv])
    return f"(from Python: {shlex.join([launcher, *argv])})"


def record_evaluation(directory: str | os.PathLike, name: str, result: dict) -> None:
    """Keep `result` (one evaluation, named by its protocol) in the model's
    evaluations.json and regenerate the card from it."""
    directory = Path(directory)
    path = directory / EVALUATIONS_NAME
    done = json.loads(path.read_text()) if path.is_file() else {}
    done[name] = result
    text = json.dumps(done, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    write_card(directory)


def write_card(directory: str | os.PathLike) -> Path:
    """(Re)write DIR/README.md from DIR/config.json and DIR/evaluations.json."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: no readable config.json for its card ({e})") from e
    evals_path = directory / EVALUATIONS_NAME
    evals = json.loads(evals_path.read_text()) if evals_path.is_file() else {}
    text = _card(meta.get("load_as", directory.name), meta, evals, meta.get("parameters"))
    atomic_write(directory / CARD_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory / CARD_NAME


def _card(name: str, meta: dict, evals: dict, params: int | None) -> str:
    kind = meta.get("model_type", "?")
    title, stage, tags = KINDS.get(kind, (kind, "model", []))
    c = meta.get("config", {})
    header = ["---", "library_name: rqgen", "license: other", "tags:"]
    header += [f"- {t}" for t in ("rqgen", "image-generation", "residual-quantization", *tags)]
    header += ["---", ""]
    rows = [("model", f"{title} ({stage})")]
    if params:
        rows.append(("parameters", f"{params / 1e6:.1f}M"))
    for key, label in (
        ("code_shape", "code shape (H, W, D)"),
        ("codebook_size", "codebook size K"),
        ("resolution", "image resolution"),
        ("coarse_size", "coarse grid"),
        ("fine_fraction", "fine fraction r"),
        ("width", "width"),
        ("spatial_layers", "spatial layers"),
        ("depth_layers", "depth layers"),
        ("position_layers", "position layers"),
        ("content_layers", "content layers"),
        ("num_classes", "classes"),
    ):
        if key in c:
            rows.append((label, str(c[key])))
    if kind == "rqvae":  # the code shape follows from the downsampling
        h = c["resolution"] // 2 ** (len(c["ch_mult"]) - 1)
        rows.insert(1, ("code shape (H, W, D)", f"{h} × {h} × {c['code_depth']}"))
    if c.get("stop_code"):
        rows.append(("code stacks", "dynamic depth: each ends at the stop code K"))
    if meta.get("conditioning"):
        rows.append(("conditioning", meta["conditioning"]))
    lines = [*header, f"# {name}", "", f"An rqgen {title}.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Training", ""]
    if meta.get("converted_from"):
        lines.append(f"Converted from the {meta['converted_from']} checkpoint `{meta['source']}`.")
    else:
        train = meta.get("train", {})
        facts = [
            ("command", f"`{meta['command']}`" if meta.get("command") else None),
            ("data", f"`{meta['data']}`" if meta.get("data") else None),
            ("data fingerprint", meta.get("data_fingerprint")),
            ("steps", meta.get("step")),
            ("batch size", train.get("batch_size")),
            ("learning rate", train.get("lr")),
            ("seed", train.get("seed")),
            ("VAE", f"`{meta['vae']}`" if meta.get("vae") else None),
        ]
        lines += [f"- {k}: {v}" for k, v in facts if v is not None] or ["Not recorded."]
    lines += ["", "## Scores", ""]
    if meta.get("val_loss") is not None:
        lines.append(f"- validation loss (hard-label NLL, held-out split): {meta['val_loss']:.4f}")
    for protocol, result in evals.items():
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in result.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        lines.append(f"- {protocol}: {shown}")
    if lines[-1] == "":
        lines.append(
            "Not evaluated yet: `rqgen eval-vae --card` / `rqgen eval-gen --card` add scores."
        )
    cls = "RQPipeline" if kind.endswith("transformer") else title.replace("-", "")
    lines += ["", "## Use", "", "```python", f"from rqgen import {cls}", ""]
    lines += [f'model = {cls}.from_pretrained("{name}")  # this directory, or its hub repository']
    lines += ["```", ""]
    return "\n".join(lines)
