"""Model cards: written with every model directory, with the hub's metadata and what the
directory records; scores added by evaluations, never typed in."""

import json
import shutil

from test_train_vae import rqgen

from rqgen.card import CARD_NAME


def test_a_trained_vae_has_a_card_that_evaluations_fill_in(vae, tmp_path):
    model = tmp_path / "vae"
    shutil.copytree(vae, model)
    card = (model / CARD_NAME).read_text()
    header = card.split("---")[1]
    assert "library_name: rqgen" in header and "- rq-vae" in header
    config = json.loads((model / "config.json").read_text())
    assert f"- steps: {config['step']}" in card and "rqgen train-vae --data bundled:digits" in card
    assert "| code shape (H, W, D) | 8 × 8 × 4 |" in card and "| codebook size K | 32 |" in card
    assert "Not evaluated yet" in card
    r = rqgen("eval-vae", "--vae", model, "--data", "bundled:digits:val", "--limit", 16,
              "--no-rfid", "--json", "--card")  # fmt: skip
    psnr = json.loads(r.stdout)["psnr"]
    card = (model / CARD_NAME).read_text()
    line = next(x for x in card.splitlines() if x.startswith("- eval-vae on bundled:digits:val"))
    assert "the first 16 images" in line and f"psnr {psnr:.4g}" in line
    kept = json.loads((model / "evaluations.json").read_text())
    assert kept["eval-vae on bundled:digits:val, the first 16 images (rqgen)"]["psnr"] == psnr
