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

import hashlib
from pathlib import Path

import pytest
from fuzz_cases import CASES
from fuzz_world import World, break_models, make_folders
from test_failures import one_line_error
from test_train_vae import rqgen


@pytest.fixture(scope="module")
def world_base(vae, class_ar, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("fuzz_corpus")
    make_folders(corpus)
    break_models(corpus, vae, class_ar)
    return vae, class_ar, corpus


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
