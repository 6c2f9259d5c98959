"""Stage 2's training data: the feature store of the run's images, their conditions (class
ids, caption tokens or the null token), the validation split and τ per depth (Eq. 15).

Everything that reads the disk for several ranks is decided or written by rank 0 and waited
for in the store (rqgen/distributed.py); the split is drawn from the seed alone, so it is
the same on every rank and every resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rqgen.checkpoint import write_json
from rqgen.data.captions import captions_for
from rqgen.data.shards import Shards
from rqgen.distributed import Runtime, from_rank0, meet_after
from rqgen.errors import ConfigError, DataError
from rqgen.stage2.text import TextTokenizer
from rqgen.train.data import run_dataset
from rqgen.train.features import (
    FeatureStore,
    StoreKey,
    StoreView,
    build_store,
    save_npy,
    source_fingerprint,
    vae_fingerprint,
)
from rqgen.train.views import FIXED_CROPS, choose_crops, store_kind, views_dataset
from rqgen.utils.device import use_cpu_budget

COUNT_LIMIT = 65536  # views counted for the "distinct code maps" line; more: not said


@dataclass
class ARData:
    store: FeatureStore
    train_set: StoreView
    val_set: StoreView
    classes: list[str]  # class names, for the model card and `rqgen sample --class NAME`
    num_classes: int
    tokenizer: TextTokenizer | None
    taus: list[float]  # τ per depth (one for DQ)


def build_ar_data(
    exp,
    vae,
    dataset,
    data: str,
    out: Path,
    rt: Runtime,
    captions: str | None,
    quiet: bool,
    depths: int,
) -> ARData:
    """The run's data (`dataset`: its listing, from `list_ar_data`), extracted into its
    store first when needed. `depths`: how many τ the codes need (D; 1 for DQ)."""
    m, t = exp.model, exp.train
    n_classes = getattr(dataset, "num_classes", 0)
    store = _features(exp, vae, dataset, data, out, rt, quiet)
    usable = np.flatnonzero(store.readable)
    if len(usable) == 0:
        raise DataError(f"none of the images of {data} could be read")
    if len(usable) < len(store) and rt.is_main:
        print(f"rqgen: warning: {len(store) - len(usable)} unreadable image(s) of {data} left out")
    classes = list(getattr(dataset, "classes", [])) if m.conditioning == "class" else []
    if isinstance(dataset, Shards) and m.conditioning == "class":  # ids from KEY.cls
        n_classes = int(store.labels.max(initial=-1)) + 1
        if n_classes <= 0:
            raise ConfigError(
                f"the samples of {data} have no KEY.cls class ids: use model.conditioning=none"
            )
        classes = [str(i) for i in range(n_classes)]
    unlabelled = int((store.labels[usable] < 0).sum())
    if m.conditioning == "class" and unlabelled:
        raise ConfigError(
            f"{unlabelled} image(s) of {data} have no class (an image outside the class "
            "subfolders, or a shard sample without KEY.cls): label them, or use "
            "model.conditioning=none"
        )
    tokenizer = None
    if m.conditioning == "class":
        cond = torch.from_numpy(store.labels)
    elif m.conditioning == "text":
        tokenizer, cond = _text_tokens(m, store, dataset, captions, out, rt)
    else:
        cond = torch.zeros(len(store), dtype=torch.long)  # the null/start token

    # deterministic validation split (the same on every rank and every resume)
    order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(t.seed))
    perm = usable[order.numpy()]
    n_val = max(1, int(len(perm) * t.val_fraction)) if t.val_fraction > 0 else 0
    val, train = perm[:n_val], perm[n_val:]
    train_set = StoreView(store, train, cond[train], t.seed, random_views=True)
    if rt.is_main and not quiet and len(train) * store.crops <= COUNT_LIMIT:
        what = "code maps" if store.meta["kind"] != "features" else "feature maps"
        print(
            f"rqgen: training sees {store.distinct(train)} distinct {what} "
            f"({len(train)} images × {store.crops} view(s))"
        )
    val_set = StoreView(store, val, cond[val])
    taus = _temperatures(t, vae.quantizer, store, train_set, out, rt, depths)
    n_classes = n_classes if m.conditioning == "class" else 0
    return ARData(store, train_set, val_set, classes, n_classes, tokenizer, taus)


def list_ar_data(exp, vae, data: str, out: Path, rt: Runtime, quiet: bool):
    """The data source listed once (rank 0 decides; no image opened: extraction marks the
    unreadable ones, and a resume reads the stored features only). A class-conditional
    experiment on data without class labels becomes unconditional, and says so: it is
    decided before the resume check, so a rerun decides the same; so are the stored views
    per image with train.feature_crops=0 (views.choose_crops: the folder's size)."""
    dataset = run_dataset(data, vae.config.resolution, exp.train.seed, out, rt)
    t = exp.train
    if t.feature_crops == 0:
        t.feature_crops = choose_crops(dataset)
        if t.feature_crops > 1 and rt.is_main and not quiet:
            print(
                f"rqgen: {len(dataset)} images: stage 2 stores the centre and "
                f"{t.feature_crops - 1} random crops/flips of each "
                "(train.feature_crops=1 for the centre only)"
            )
    unlabelled = getattr(dataset, "num_classes", 0) == 0 and not isinstance(dataset, Shards)
    if exp.model.conditioning == "class" and unlabelled:
        exp.model.conditioning = "none"
        if rt.is_main and not quiet:
            print(
                f"rqgen: {data} has no class labels (no subfolders): training an "
                "unconditional model (model.conditioning=none)"
            )
    return dataset


def _features(exp, vae, dataset, data: str, out: Path, rt: Runtime, quiet: bool) -> FeatureStore:
    """The feature store of this data, VAE and crop policy: opened when it exists, else
    extracted first, each rank encoding its share of the chunks."""
    t = exp.train
    res = vae.config.resolution
    key = StoreKey(
        source=source_fingerprint(dataset, data, t.seed),
        resolution=res,
        crops=t.feature_crops,
        vae=vae_fingerprint(vae),
        kind=store_kind(vae, t.soft_labels or t.stochastic_codes or exp.model.mean_depth > 0),
        seed=0 if t.feature_crops in FIXED_CROPS else t.seed,
    )
    views = meet_after(rt, lambda: views_dataset(dataset, data, res, t.feature_crops, t.seed))
    root = Path(t.features).expanduser() if t.features else out / "features"
    workers, _ = use_cpu_budget(t.extract_workers)
    return build_store(root, key, vae, views, rt, workers=workers, quiet=quiet)


def _temperatures(
    t, quantizer, store: FeatureStore, train_set: StoreView, out: Path, rt: Runtime, depths: int
) -> list[float]:
    """τ per depth (Eq. 15): train.tau, times the mean squared quantization error of each
    depth over the first 256 training items with tau_unit=quantization_error."""
    if store.meta["kind"] != "features" or t.tau_unit == "absolute":
        return [t.tau] * depths
    path = out / "quantization_error.json"  # measured once per run and store

    def measured() -> dict:  # rank 0 reads, or measures and writes; every rank gets it
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if saved.get("store") != store.path.name:
            n = min(len(train_set), 256)  # 16k vectors at 8×8: a close enough mean
            errs = [
                quantizer.quantization_error(train_set.batch(s, s + 64)[0].to(rt.device))
                * min(64, n - s)
                for s in range(0, n, 64)
            ]
            saved = {"store": store.path.name, "per_depth": [float(e) / n for e in sum(errs)]}
            write_json(path, saved)
        return saved

    saved = from_rank0(rt, measured)
    return [t.tau * max(e, 1e-12) for e in saved["per_depth"]]


def _text_tokens(
    m, store: FeatureStore, dataset, captions: str | None, out: Path, rt: Runtime
) -> tuple[TextTokenizer, torch.Tensor]:
    """Captions tokenized by this run's BPE (trained on them by rank 0, once)."""
    path = out / "text_tokens.npy"
    texts = lambda: _captions(store, dataset, captions)  # noqa: E731

    def tokenize() -> None:  # rank 0, once per run; the others wait in the store
        if not (out / "tokenizer.json").is_file():
            TextTokenizer.train(texts(), m.text_vocab_size, m.text_length).save(out)
        if not path.is_file():
            save_npy(path, TextTokenizer.load(out, m.text_length).encode(texts()).numpy())

    from_rank0(rt, tokenize)
    return TextTokenizer.load(out, m.text_length), torch.from_numpy(np.load(path))


def _captions(store: FeatureStore, dataset, manifest: str | None) -> list[str]:
    if not isinstance(dataset, Shards):
        return captions_for(dataset, manifest)
    texts = store.captions()  # KEY.txt, kept by the extraction
    missing = [i for i, t in enumerate(texts) if t is None and store.readable[i]]
    if manifest or missing:
        raise DataError(
            "text conditioning on tar shards reads KEY.txt next to each image"
            f"{', not --captions' if manifest else ''}; {len(missing)} sample(s) have none"
        )
    return [t or "" for t in texts]
