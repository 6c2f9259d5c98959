"""The fuzz cases, generated where they can be: every way of breaking a model directory
against every command that loads one, every numeric option out of its range, bad overrides,
data, sampling arguments and outputs, injected faults, and odd but usable input."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import json
from collections.abc import Callable

import numpy as np
import torch
from fuzz_world import BASE, BREAKAGES, Case, World, set_flag
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from test_train_ar import AR_TINY
from test_train_vae import TINY, metrics, rqgen

from rqgen.cli import build_parser
from rqgen.stage1.rqvae import RQVAEConfig
from rqgen.stage2.rq_transformer import RQTransformerConfig


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
            lambda w: set_flag(BASE["eval-gen"](w), "--model", w.bad(bad)),
        ),  # fmt: skip
    ]


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
                return set_flag(a, "--data", src)

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
        return lambda w: set_flag(BASE[command](w), "--out", where(w))

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
        Case("push/offline", lambda w: set_flag(BASE["push"](w), "--model", w.ar),
             expect=("HF_HUB_OFFLINE",), fault=lambda mp: mp.setenv("HF_HUB_OFFLINE", "1")),
        Case("push/the hub unreachable", lambda w: set_flag(BASE["push"](w), "--model", w.ar),
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
