"""Fuzz: every command against a corpus of bad inputs generated here (data, configs,
checkpoints, sampling arguments, output paths, faults). Each case must end either in a
non-zero exit with one line on stderr and no traceback, or in a warning and a result that is
checked; and no case may change a file that existed before it ran.

The corpus is generated, not listed by hand where it can be: every numeric option of every
command gets values outside its declared range, and every way of breaking a model directory
is tried against every command that loads one. Cases run in this process (the `rqgen`
helper), so ~200 of them cost about half a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import importlib
import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from safetensors.torch import load_file, save_file
from test_failures import one_line_error
from test_train_ar import AR_TINY
from test_train_vae import TINY, metrics, rqgen

from rqgen.cli import build_parser
from rqgen.stage1.rqvae import RQVAEConfig
from rqgen.stage2.rq_transformer import RQTransformerConfig


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


def _folders(root: Path) -> None:
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


def _break_models(root: Path, vae: Path, ar: Path) -> None:
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


@pytest.fixture(scope="module")
def world_base(vae, class_ar, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("fuzz_corpus")
    _folders(corpus)
    _break_models(corpus, vae, class_ar)
    return vae, class_ar, corpus


# ---------------------------------------------------------------- the cases


def _vae_users(name: str) -> list[Case]:
    bad = f"vae_{name}"
    return [
        Case(
            f"eval-vae/--vae {bad}",
            lambda w: [
                "eval-vae",
                "--vae",
                w.bad(bad),
                "--data",
                "bundled:digits:val",
                "--limit",
                4,
            ],
        ),  # fmt: skip
        Case(
            f"reconstruct/--vae {bad}",
            lambda w: [
                "reconstruct",
                "--vae",
                w.bad(bad),
                "--input",
                w.bad("one.png"),
                "--out",
                w.tmp / "r",
            ],
        ),  # fmt: skip
        Case(
            f"train-ar/--vae {bad}",
            lambda w: [
                "train-ar",
                "--vae",
                w.bad(bad),
                "--data",
                "bundled:digits",
                "--out",
                w.tmp / "ar",
                "--steps",
                1,
                *AR_TINY,
            ],
        ),  # fmt: skip
        Case(
            f"sample/--vae {bad}",
            lambda w: [
                "sample",
                "--model",
                w.ar,
                "--vae",
                w.bad(bad),
                "--n",
                2,
                "--out",
                w.tmp / "s.png",
            ],
        ),  # fmt: skip
    ]


def _ar_users(bad: str) -> list[Case]:
    return [
        Case(
            f"sample/--model {bad}",
            lambda w: ["sample", "--model", w.bad(bad), "--n", 2, "--out", w.tmp / "s.png"],
        ),  # fmt: skip
        Case(
            f"eval-gen/--model {bad}",
            lambda w: _set_flag(BASE["eval-gen"](w), "--model", w.bad(bad)),
        ),  # fmt: skip
    ]


def _set_flag(argv: list, flag: str, value) -> list:
    """argv with the value after `flag` replaced."""
    i = argv.index(flag)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def _checkpoint_cases() -> list[Case]:
    cases = []
    for name in BREAKAGES:
        cases += _vae_users(name)
        cases += _ar_users(f"ar_{name}")
    for i in range(4):
        cases += _vae_users(f"header_flip_{i}")[:1] + _ar_users(f"ar_header_flip_{i}")[:1]
    for f in dataclasses.fields(RQVAEConfig):
        cases += _vae_users(f"field_{f.name}")[:1]  # eval-vae
    for f in dataclasses.fields(RQTransformerConfig):
        cases += _ar_users(f"ar_field_{f.name}")[:1]  # sample
    for special in ("ar_lost_vae", "ar_vae_is_ar", "not_a_model", "missing", "one.png"):
        cases += _ar_users(special)
    for special in ("not_a_model", "missing", "one.png", "empty"):
        for c in _vae_users("x"):
            cases.append(Case(c.id.replace("vae_x", special), _swap(c.argv, "vae_x", special)))
    return cases


def _swap(argv: Callable, old: str, new: str) -> Callable:
    def build(w: World):
        return [w.bad(new) if a == w.bad(old) else a for a in argv(w)]

    return build


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
    "refit-codebook": lambda w: ["refit-codebook", "--vae", w.vae, "--data", "bundled:digits",
                                 "--out", w.tmp / "r", "--steps", 1],  # fmt: skip
    "fid-stats": lambda w: [
        "fid-stats",
        "bundled:digits:val",
        "--out",
        w.tmp / "f.npz",
        "--features",
        "digits",
    ],  # fmt: skip
}


def _out_of_range(rule) -> list[str]:
    """Values each numeric option must refuse: below, above, not a number, not finite."""
    values = ["abc", "nan", "inf"]
    step = 1 if rule.kind == "int" else 0.5
    if rule.low is not None:
        values.append(f"{rule.low if rule.open_low else rule.low - step:g}")
    if rule.high is not None:
        values.append(f"{rule.high if rule.open_high else rule.high + step:g}")
    if rule.kind == "int":
        values.append("1.5")
    return values


def _numeric_option_cases() -> list[Case]:
    """Every numeric option of every command, from the parser itself: an option added later
    is fuzzed without anyone listing it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for command, p in sub.choices.items():
        assert command in BASE, f"add a valid command line for {command} to BASE"
        for action in p._actions:
            rule = getattr(action.type, "rule", None)
            if rule is None or not action.option_strings:
                continue
            for value in _out_of_range(rule):
                flag = action.option_strings[-1]
                cases.append(Case(f"{command}/{flag}={value}",
                                  lambda w, b=BASE[command], f=flag, v=value: [*b(w), f, v],
                                  expect=(flag, "must be")))  # fmt: skip
    return cases


def _override_cases() -> list[Case]:
    bad = ["model.ch=abc", "model.not_a_field=1", "nonsense.x=1", "train.lr=nan", "train.lr=inf",
           "train.batch_size=1.5", "model.ch_mult=[1,x]", "model.ch_mult=[]", "model.ch=",
           "=5", "model=5", "train.log_every=[1]", "model.shared_codebook=maybe"]  # fmt: skip
    cases = []
    for command in ("train-vae", "train-ar"):
        for o in bad:
            cases.append(Case(f"{command}/{o}", lambda w, c=command, o=o: [*BASE[c](w), o]))
        for f in ("missing.yaml", "list.yaml", "syntax.yaml", "unknown_section.yaml",
                  "unknown_key.yaml", "python_tag.yaml", "empty", "no_such_preset"):  # fmt: skip
            cases.append(Case(f"{command}/--config {f}", lambda w, c=command, f=f: [
                *BASE[c](w), "--config", w.bad(f) if "." in f or f == "empty" else f]))  # fmt: skip
    cases.append(Case("plan/--config missing", lambda w: [
        "plan", "--config", w.bad("x.yaml"), "--gpus", 1, "--gpu-mem", 16]))  # fmt: skip
    return cases


def _data_cases() -> list[Case]:
    sources = ["missing", "empty", "texts", "all_bad", "one.png", "bomb.png", "garbage.tar"]
    named = ["bundled:nope", "bundled:digits:nosplit", "bundled:", ":", "", "nope-{0..3}.tar",
             "a.tar::b.png"]  # fmt: skip
    cases = []
    for command in ("train-vae", "train-ar", "eval-vae", "fid-stats"):

        def at(w, c=command):
            return BASE[c](w)

        for s in sources + named:

            def argv(w, at=at, s=s):
                src = str(w.bad(s)) if s in sources else s
                a = at(w)
                if a[0] == "fid-stats":
                    return ["fid-stats", src, *a[2:]]
                return _set_flag(a, "--data", src)

            cases.append(Case(f"{command}/--data {s or 'EMPTY'}", argv))
    for s in ("missing", "cut.png", "bomb.png", "empty", "texts", "prompts_empty.txt"):
        cases.append(Case(f"reconstruct/--input {s}", lambda w, s=s: [
            "reconstruct", "--vae", w.vae, "--input", w.bad(s), "--out", w.tmp / "r"]))  # fmt: skip
    cases.append(Case("train-ar/--captions short", lambda w: [
        *BASE["train-ar"](w), "--captions", w.bad("captions_short.txt")]))  # fmt: skip
    cases.append(Case("train-ar/--captions missing", lambda w: [
        *BASE["train-ar"](w), "--captions", w.bad("missing.txt")]))  # fmt: skip
    for ref in ("stats.npz", "other.npz", "missing.npz", "empty", "adm_float.npz",
                "adm_stats.npz"):  # fmt: skip
        cases.append(Case(f"eval-gen/--ref {ref}", lambda w, r=ref: [
            "eval-gen", "--samples", w.bad("mixed"), "--ref", w.bad(r), "--features",
            "digits"]))  # fmt: skip
    cases.append(Case("eval-gen/--samples empty", lambda w: [
        "eval-gen", "--samples", w.bad("empty"), "--ref", "bundled:digits:val", "--features",
        "digits"]))  # fmt: skip
    cases.append(Case("serve/--model not_a_model", lambda w: [
        "serve", "--model", w.bad("not_a_model"), "--port", 1]))  # fmt: skip
    cases.append(Case("convert-official/--stage1 not_a_model", lambda w: [
        "convert-official", "--stage1", w.bad("not_a_model"), "--out", w.tmp / "c"]))  # fmt: skip
    cases.append(Case("convert-official/--stage1 a rqgen model", lambda w: [
        "convert-official", "--stage1", w.vae, "--out", w.tmp / "c"]))  # fmt: skip
    return cases


def _sampling_cases() -> list[Case]:
    bad = [["--class", "99"], ["--class", "banana"], ["--class", "-1"], ["--prompt", "a cat"],
           ["--class", "10"], ["--unconditional", "--accept", "0.5"],
           ["--device", "cuda"], ["--device", "tpu"], ["--device", "cuda:x"],
           ["--clip-rerank", "2", "--clip", "/nonexistent/clip"],
           ["--save-codes", "/dev/null/codes.npy"], ["--dtype", "fp8"],
           ["--top-k", "4,0"], ["--top-p", "0.5,1.5"],
           ["--top-k", "1,2,3,4,5,6,7,8,9"]]  # fmt: skip
    cases = [Case(f"sample/{' '.join(b)}", lambda w, b=b: [*BASE["sample"](w), *b]) for b in bad]
    for b in (["--prompts", "/nonexistent/p.txt"], ["--per-class", "3", "--n", "5"],
              ["--device", "cuda"], ["--features", "nope"], ["--protocol", "fid"],
              ["--save-npz", "/dev/null/s.npz"],
              ["--save-features", "/dev/null/f.npz"]):  # fmt: skip
        cases.append(Case(f"eval-gen/{' '.join(b)}", lambda w, b=b: [*BASE["eval-gen"](w), *b]))
    cases.append(Case("eval-vae/--device cuda", lambda w: [*BASE["eval-vae"](w), "--device",
                                                           "cuda"]))  # fmt: skip
    for b in (["--save-recons", "/dev/null/r.npz"], ["--protocol", "clean"],
              ["--save-features", "f.npz", "--no-rfid"]):  # fmt: skip
        cases.append(Case(f"eval-vae/{' '.join(b)}", lambda w, b=b: [*BASE["eval-vae"](w), *b]))
    cases.append(Case("train-vae/--device cuda", lambda w: [*BASE["train-vae"](w), "--device",
                                                            "cuda"]))  # fmt: skip
    return cases


def _output_cases() -> list[Case]:
    def under_file(w):
        (w.tmp / "file").write_text("a file")
        return w.tmp / "file" / "sub"

    def a_file(w):
        (w.tmp / "file").write_text("a file")
        return w.tmp / "file"

    def a_dir(w):
        (w.tmp / "dir.png").mkdir()
        return w.tmp / "dir.png"

    def with_out(command, where):
        return lambda w: _set_flag(BASE[command](w), "--out", where(w))

    cases = []
    for command in ("train-vae", "train-ar", "reconstruct", "sample", "fid-stats", "demo",
                    "convert-official"):  # fmt: skip
        cases.append(Case(f"{command}/--out under a file", with_out(command, under_file)))
    for command in ("train-vae", "train-ar", "demo"):
        cases.append(Case(f"{command}/--out a file", with_out(command, a_file)))
    for command in ("sample", "fid-stats"):
        cases.append(Case(f"{command}/--out a directory", with_out(command, a_dir)))
    cases.append(Case("fid-stats/--out not .npz", lambda w: [
        *BASE["fid-stats"](w), "--out", w.tmp / "stats.txt"]))  # fmt: skip
    cases.append(Case("train-vae/--out a transformer", with_out("train-vae", lambda w: w.ar)))
    cases.append(Case("train-ar/--out a vae", with_out("train-ar", lambda w: w.vae)))
    cases.append(Case("eval-gen/--out a file", lambda w: [*BASE["eval-gen"](w), "--out",
                                                          a_file(w)]))  # fmt: skip
    return cases


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _fault_cases() -> list[Case]:
    return [
        Case("sample/disk full on the grid", BASE["sample"],
             fault=lambda mp: mp.setattr(Image.Image, "save", _no_space)),
        Case("reconstruct/disk full", BASE["reconstruct"],
             fault=lambda mp: mp.setattr(Image.Image, "save", _no_space)),
        Case("fid-stats/disk full", BASE["fid-stats"],
             fault=lambda mp: mp.setattr(np, "savez", _no_space)),
        Case("eval-vae/an image unreadable mid-run",
             lambda w: ["eval-vae", "--vae", w.vae, "--data", w.bad("mixed")],
             fault=lambda mp: mp.setattr(Image, "open", _no_space)),
        Case("train-vae/out of memory",
             BASE["train-vae"],
             fault=lambda mp: mp.setattr(torch.Tensor, "backward", _oom)),
        Case("push/--model missing", BASE["push"], expect=("missing", "not a model directory")),
        Case("push/offline", lambda w: _set_flag(BASE["push"](w), "--model", w.ar),
             expect=("HF_HUB_OFFLINE",), fault=lambda mp: mp.setenv("HF_HUB_OFFLINE", "1")),
        Case("push/the hub unreachable", lambda w: _set_flag(BASE["push"](w), "--model", w.ar),
             expect=("pushing", "failed", "nothing was committed"),
             fault=lambda mp: mp.setattr(HTTP_LIB.HTTPTransport, "handle_request", _unreachable)),
    ]  # fmt: skip


# the HTTP library huggingface_hub is built on (httpx, or httpx2 in later releases)
HTTP_LIB = importlib.import_module(
    next(c for c in HfHubHTTPError.__mro__ if c.__name__ == "HTTPError").__module__.split(".")[0]
)


def _unreachable(*args, **kwargs):
    raise HTTP_LIB.ConnectError("[Errno -3] Temporary failure in name resolution")


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _trained_on_the_good_images(w: World, r) -> None:
    assert "skip" in r.stderr.lower() or "warning" in r.stderr.lower(), r.stderr
    assert [m["step"] for m in metrics(w.tmp / "v") if "loss" in m] == [1]


def _scored_the_good_images(w: World, r) -> None:
    assert "warning" in r.stderr.lower() or "skip" in r.stderr.lower(), r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n_images"] == 4


def _same_as_no_top_k(w: World, r) -> None:
    reference = rqgen("sample", "--model", w.ar, "--n", 2, "--out", w.tmp / "ref.png")
    assert reference.returncode == 0
    a, b = Image.open(w.tmp / "s.png"), Image.open(w.tmp / "ref.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))


def _same_as_greedy(w: World, r) -> None:
    """A guidance scale that overflows the logits draws what top-k 1 draws (the limit it
    tends to), not garbage from a NaN softmax."""
    a = np.load(w.tmp / "codes.npy")
    greedy = rqgen(*BASE["sample"](w), "--top-k", 1, "--cfg", "1e30", "--out", w.tmp / "g.png",
                   "--save-codes", w.tmp / "greedy.npy")  # fmt: skip
    assert greedy.returncode == 0 and np.array_equal(a, np.load(w.tmp / "greedy.npy"))


def _a_jpeg_grid(w: World, r) -> None:
    assert (w.tmp / "s.jpg").is_file() and Image.open(w.tmp / "s.jpg").format == "JPEG"


def _warned_cases() -> list[Case]:
    """Odd but usable input: a warning and a correct result."""
    return [
        Case("train-vae/--data mixed good and broken",
             lambda w: ["train-vae", "--data", w.bad("mixed"), "--out", w.tmp / "v", "--steps",
                        1, *TINY, "train.batch_size=4"],
             check=_trained_on_the_good_images),
        Case("eval-vae/--data mixed good and broken",
             lambda w: ["eval-vae", "--vae", w.vae, "--data", w.bad("mixed"), "--json",
                        "--no-rfid"],
             check=_scored_the_good_images),
        Case("sample/--cfg 1e30 overflows the logits",
             lambda w: [*BASE["sample"](w), "--cfg", "1e30", "--save-codes", w.tmp / "codes.npy"],
             check=_same_as_greedy),
        Case("sample/--out x.jpg is a grid",
             lambda w: ["sample", "--model", w.ar, "--n", 2, "--out", w.tmp / "s.jpg"],
             check=_a_jpeg_grid),
        Case("sample/--top-k above the codebook",
             lambda w: [*BASE["sample"](w), "--top-k", 100000],
             check=_same_as_no_top_k),
    ]  # fmt: skip


CASES = [
    *_checkpoint_cases(),
    *_numeric_option_cases(),
    *_override_cases(),
    *_data_cases(),
    *_sampling_cases(),
    *_output_cases(),
    *_fault_cases(),
    *_warned_cases(),
]


def test_the_corpus_is_large_and_its_names_unique():
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)


def _snapshot(*roots: Path) -> dict[Path, str]:
    files = {}
    for root in roots:
        for p in [root] if root.is_file() else root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                files[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fuzz(case, world_base, tmp_path, monkeypatch, rqgen_cache):
    vae, ar, corpus = world_base
    world = World(vae, ar, corpus, tmp_path)
    argv = case.argv(world)  # may create files in tmp_path: they count as written before
    # what the case names, the models every case may reach, and its own directory
    named = [Path(a) for a in map(str, argv) if a.startswith(str(corpus)) and Path(a).exists()]
    roots = [vae, ar, tmp_path, *named]
    before = _snapshot(*roots)
    if case.fault:
        case.fault(monkeypatch)
    r = rqgen(*argv, check=False, env_extra=rqgen_cache)
    monkeypatch.undo()
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "a pickle payload ran" not in r.stdout + r.stderr
    if case.check:
        assert r.returncode == 0, r.stderr[-3000:]
        case.check(world, r)
    else:
        one_line_error(r, *case.expect)
    after = _snapshot(*roots)
    changed = [str(p) for p, h in before.items() if after.get(p) != h]
    assert not changed, f"files written before the case changed: {changed}"


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"model": 5}', b"\xff\xfe\x00"])
def test_a_corrupt_tokenizer_file_is_one_error_naming_it(tmp_path, content):
    from rqgen.errors import CheckpointError
    from rqgen.stage2.text import FILE, TextTokenizer

    (tmp_path / FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{FILE} is not a tokenizer file"):
        TextTokenizer.load(tmp_path)
