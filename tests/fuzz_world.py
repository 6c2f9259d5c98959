"""The fuzz tests' world: what a case points at (good models, a corpus of broken copies,
files and folders, made once per session) and a valid command line per command (BASE), to
which a case adds one bad thing."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train_ar import AR_TINY
from test_train_vae import TINY


@dataclass
class World:
    """What a case can point at: good models, broken copies of them, files and folders."""

    vae: Path
    ar: Path
    corpus: Path  # broken inputs, made once per session
    tmp: Path  # this case's own directory, for outputs

    def bad(self, name: str) -> Path:
        return self.corpus / name


@dataclass
class Case:
    id: str
    argv: Callable[[World], list]
    expect: tuple[str, ...] = ()  # words the one-line error must contain
    check: Callable[[World, object], None] | None = None  # a case that succeeds: its result
    fault: Callable[[pytest.MonkeyPatch], None] | None = None


# ---------------------------------------------------------------- the corpus on disk


def _png(path: Path, size=(40, 40), mode="RGB", seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def _bomb(path: Path) -> Path:
    """A PNG whose header claims 30000×30000 pixels (900 MP): refused before decoding."""
    Image.new("1", (30000, 30000)).save(path)  # 1-bit zeros compress to a few KiB
    return path


def make_folders(root: Path) -> None:
    (root / "empty").mkdir()
    (root / "garbage.tar").write_bytes(b"not a tar file" * 100)
    (root / "texts").mkdir()
    (root / "texts" / "readme.txt").write_text("no images here")
    (root / "all_bad").mkdir()
    (root / "all_bad" / "zero.png").write_bytes(b"")
    (root / "all_bad" / "text.jpg").write_text("not a jpeg")
    good = _png(root / "one.png")
    (root / "all_bad" / "cut.png").write_bytes(good.read_bytes()[:100])
    _bomb(root / "all_bad" / "bomb.png")
    mixed = root / "mixed"
    mixed.mkdir()
    for i in range(4):
        _png(mixed / f"good{i}.png", seed=i)
    for p in (root / "all_bad").iterdir():
        shutil.copy(p, mixed / p.name)
    (root / "a_file.png").write_bytes(good.read_bytes())
    _bomb(root / "bomb.png")
    (root / "cut.png").write_bytes(good.read_bytes()[:100])
    (root / "captions_short.txt").write_text("one caption\n")
    (root / "prompts_empty.txt").write_text("")
    (root / "stats.npz").write_bytes(b"PK\x03\x04 not a zip")
    np.savez(root / "other.npz", a=np.zeros(3))
    np.savez(root / "adm_float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))  # not uint8
    # Inception statistics only: no images for another network to score
    np.savez(root / "adm_stats.npz", mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(2),
             sigma_s=np.eye(2))  # fmt: skip
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "syntax.yaml").write_text("model: {ch: [1,\n")
    (root / "unknown_section.yaml").write_text("nonsense:\n  x: 1\n")
    (root / "unknown_key.yaml").write_text("model:\n  not_a_field: 1\n")
    (root / "python_tag.yaml").write_text("model: !!python/object/apply:os.system ['true']\n")


class _Evil:
    def __reduce__(self):
        return (print, ("a pickle payload ran",))


def _set_config(key, value):
    def edit(d: Path):
        raw = json.loads((d / "config.json").read_text())
        raw["config"][key] = value
        (d / "config.json").write_text(json.dumps(raw))

    return edit


def _set_top(key, value):
    def edit(d: Path):
        raw = json.loads((d / "config.json").read_text())
        raw[key] = value
        (d / "config.json").write_text(json.dumps(raw))

    return edit


def _weights(edit):
    def apply(d: Path):
        w = load_file(str(d / "model.safetensors"))
        edit(w)
        save_file(w, str(d / "model.safetensors"))

    return apply


def _first(w, pred=lambda t: t.is_floating_point() and t.dim() >= 2):
    return next(k for k, t in w.items() if pred(t))


def _nan(w):
    w[_first(w)].view(-1)[0] = float("nan")


def _reshape(w):
    k = _first(w)
    w[k] = torch.zeros(w[k].shape[0] + 1, *w[k].shape[1:])


def _as_int(w):
    k = _first(w)
    w[k] = w[k].to(torch.int64)


def _unlink(name):
    return lambda d: (d / name).unlink()


def _write(name, data: bytes | str):
    def apply(d: Path):
        p = d / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)

    return apply


def _half(name):
    def apply(d: Path):
        p = d / name
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    return apply


def _weights_dir(d: Path):
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "no_config": _unlink("config.json"),
    "config_not_json": _write("config.json", "{not json"),
    "config_a_list": _write("config.json", "[1, 2]"),
    "config_binary": _write("config.json", b"\xff\xfe\x00garbage"),
    "config_no_model_type": lambda d: _set_top("model_type", None)(d),
    "config_other_type": _set_top("model_type", "banana"),
    "config_unknown_field": _set_config("not_a_field", 1),
    "config_out_of_range": _set_config("codebook_size", 0),
    "config_wrong_type": _set_config("codebook_size", "many"),
    "config_nan": _set_config("codebook_size", float("nan")),
    "config_section_a_list": _set_top("config", [1, 2]),
    "no_weights": _unlink("model.safetensors"),
    "weights_empty": _write("model.safetensors", b""),
    "weights_half": _half("model.safetensors"),
    "weights_garbage": _write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
    "weights_pickle": _write("model.safetensors", pickle.dumps(_Evil())),
    "weights_a_directory": _weights_dir,
    "weights_missing_tensor": _weights(lambda w: w.pop(_first(w))),
    "weights_extra_tensor": _weights(lambda w: w.__setitem__("stray.weight", torch.zeros(2))),
    "weights_wrong_shape": _weights(_reshape),
    "weights_integer": _weights(_as_int),
    "weights_nan": _weights(_nan),
}


def _field_breakages(model: Path) -> dict[str, Callable[[Path], None]]:
    """Every field of a model's config.json given a value of the wrong type."""
    raw = json.loads((model / "config.json").read_text())["config"]
    return {f"field_{k}": _set_config(k, 5 if isinstance(v, str) else "x") for k, v in raw.items()}


def _flip_header_bytes(seed: int):
    """Random bytes of the safetensors header (its JSON, names, dtypes, offsets) changed."""

    def apply(d: Path):
        p = d / "model.safetensors"
        data = bytearray(p.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        rng = np.random.default_rng(seed)
        for i in rng.choice(np.arange(8, header), 4, replace=False):
            data[i] = (data[i] + int(rng.integers(1, 255))) % 256
        p.write_bytes(bytes(data))

    return apply


def _all_breakages(good: Path) -> dict[str, Callable[[Path], None]]:
    flips = {f"header_flip_{s}": _flip_header_bytes(s) for s in range(4)}
    return {**BREAKAGES, **flips, **_field_breakages(good)}


def break_models(root: Path, vae: Path, ar: Path) -> None:
    for kind, good in (("vae", vae), ("ar", ar)):
        for name, breakage in _all_breakages(good).items():
            d = root / f"{kind}_{name}"
            shutil.copytree(good, d, ignore=shutil.ignore_patterns("train_state", "features*"))
            if kind == "ar":
                _set_top("vae", str(vae))(d)
            breakage(d)
    (root / "ar_lost_vae").mkdir()
    shutil.copytree(ar, root / "ar_lost_vae", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("train_state", "features*"))  # fmt: skip
    _set_top("vae", str(root / "nowhere"))(root / "ar_lost_vae")
    shutil.copytree(ar, root / "ar_vae_is_ar", ignore=shutil.ignore_patterns("train_state"))
    _set_top("vae", str(ar))(root / "ar_vae_is_ar")
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("hello")


def set_flag(argv: list, flag: str, value) -> list:
    """argv with the value after `flag` replaced."""
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


BASE = {  # a valid command line per command, to which one bad option is added
    "train-vae": lambda w: [
        "train-vae",
        "--data",
        "bundled:digits",
        "--out",
        w.tmp / "v",
        "--steps",
        1,
        *TINY,
    ],  # fmt: skip
    "eval-vae": lambda w: ["eval-vae", "--vae", w.vae, "--data", "bundled:digits:val"],
    "reconstruct": lambda w: [
        "reconstruct",
        "--vae",
        w.vae,
        "--input",
        w.bad("one.png"),
        "--out",
        w.tmp / "r",
    ],  # fmt: skip
    "train-ar": lambda w: [
        "train-ar",
        "--vae",
        w.vae,
        "--data",
        "bundled:digits",
        "--out",
        w.tmp / "ar",
        "--steps",
        1,
        *AR_TINY,
    ],  # fmt: skip
    "prepare": lambda w: [
        "prepare",
        "--data",
        w.bad("mixed"),
        "--out",
        w.tmp / "p",
        "--resolution",
        32,
    ],  # fmt: skip
    "plan": lambda w: ["plan", "--config", "ar-tiny", "--gpus", 1, "--gpu-mem", 16],
    "sample": lambda w: ["sample", "--model", w.ar, "--n", 2, "--out", w.tmp / "s.png"],
    "demo": lambda w: ["demo", "--out", w.tmp / "demo"],
    "serve": lambda w: ["serve", "--model", w.bad("missing")],
    "convert-official": lambda w: [
        "convert-official",
        "--stage1",
        w.bad("missing"),
        "--out",
        w.tmp / "c",
    ],  # fmt: skip
    "eval-gen": lambda w: [
        "eval-gen",
        "--model",
        w.ar,
        "--n",
        4,
        "--ref",
        "bundled:digits:val",
        "--features",
        "digits",
        "--out",
        w.tmp / "g",
    ],  # fmt: skip
    "push": lambda w: ["push", "--model", w.bad("missing"), "--repo", "org/name"],
    "refit-codebook": lambda w: [
        "refit-codebook",
        "--vae",
        w.vae,
        "--data",
        "bundled:digits",
        "--out",
        w.tmp / "r",
        "--steps",
        1,
    ],  # fmt: skip
    "fid-stats": lambda w: [
        "fid-stats",
        "bundled:digits:val",
        "--out",
        w.tmp / "f.npz",
        "--features",
        "digits",
    ],  # fmt: skip
}
