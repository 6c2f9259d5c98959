"""Captions for text-conditional training: a sidecar `.txt` next to each image, or a JSONL /
CSV manifest mapping file names to captions. The bundled digits caption themselves."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from torch.utils.data import Dataset

from rqgen.data.bundled import BundledDigits
from rqgen.errors import DataError
from rqgen.utils.files import read_text

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def read_manifest(path: str | Path) -> dict[str, str]:
    """{file name or relative path: caption} from JSONL ({"file": ..., "caption": ...}) or
    CSV with `file,caption` columns."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        raise DataError(f"caption manifest '{path}' must be .jsonl or .csv")
    text = read_text(path, "caption manifest")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        return {str(r["file"]): str(r["caption"]) for r in rows}
    except json.JSONDecodeError as e:
        raise DataError(f"caption manifest '{path}' line {e.lineno}: not JSON ({e.msg})") from e
    except (KeyError, TypeError) as e:
        raise DataError(f"caption manifest '{path}': every row needs 'file' and 'caption'") from e


def captions_for(dataset: Dataset, manifest: str | Path | None = None) -> list[str]:
    """One caption per dataset item, or a one-line DataError naming the first image without."""
    if isinstance(dataset, BundledDigits):
        if manifest:
            raise DataError("the bundled digits caption themselves: drop --captions")
        return [
            f"a handwritten digit {DIGIT_NAMES[int(dataset[i][1])]}" for i in range(len(dataset))
        ]
    paths = getattr(dataset, "paths", None)
    if paths is None:
        raise DataError("this dataset has no captions: text conditioning needs an image folder")
    table = read_manifest(manifest) if manifest else {}
    root = Path(getattr(dataset, "source_root", getattr(dataset, "root", ".")))
    sidecars = getattr(dataset, "sidecar_captions", None)  # prepared data kept them
    out = []
    for i, p in enumerate(map(Path, paths)):
        rel = str(p.relative_to(root)) if p.is_relative_to(root) else p.name
        caption = table.get(rel) or table.get(p.name)
        if caption is None and sidecars is not None:
            caption = sidecars[i]
        elif caption is None and p.with_suffix(".txt").is_file():
            caption = p.with_suffix(".txt").read_text().strip()
        if not caption:
            raise DataError(
                f"no caption for '{p}': add {p.with_suffix('.txt').name} next to it "
                "or list it in a --captions manifest"
            )
        out.append(caption)
    return out
