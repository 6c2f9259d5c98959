"""Stage 2 at scale: FSDP2 on 2 gloo ranks against DDP, exact resume under FSDP, activation
checkpointing."""

import json
import subprocess
import sys

import pytest
import torch
from test_train_ar import AR_TINY
from test_train_vae import ENV, rqgen

from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig
from rqgen.train.state import TrainState

pytestmark = pytest.mark.slow


def test_activation_checkpointing_leaves_loss_and_gradients_unchanged():
    torch.manual_seed(0)
    cfg = RQTransformerConfig(codebook_size=32, code_shape=[3, 3, 4], embed_dim=8, width=32,
                              heads=4, spatial_layers=2, depth_layers=2, dropout=0.2,
                              num_classes=3, shared_codebook=False)  # fmt: skip
    model = RQTransformer(cfg, torch.randn(4, 32, 8)).train()
    codes, cond = torch.randint(32, (4, 9, 4)), torch.tensor([0, 1, 2, 3])

    def loss_and_grads(checkpointing: bool):
        for t in (model.spatial_transformer, model.depth_transformer):
            t.checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks: recomputation must replay them
        loss, _ = model.loss(codes, cond)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain = loss_and_grads(False)
    ckpt_loss, ckpt = loss_and_grads(True)
    assert torch.equal(plain_loss, ckpt_loss)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-7, msg=name)


def torchrun_train_ar(vae, out, steps, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rqgen", "train-ar", "--vae", str(vae), "--data", "bundled:digits", "--out",
           str(out), "--steps", str(steps), "--device", "cpu", *AR_TINY, "train.eval_every=2",
           *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def torchrun_two_nodes(vae, out, steps, *extra):
    """Two torchrun agents of one process each, as two nodes would start them: HSDP then
    replicates across the "nodes" (LOCAL_WORLD_SIZE 1) and shards within each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--vae", str(vae), "--data", "bundled:digits", "--out", str(out), "--steps",
            str(steps), "--device", "cpu", *AR_TINY, "train.eval_every=2", *extra]  # fmt: skip
    run = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
           "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*run, "--node_rank", str(node), "-m", "rqgen", "train-ar", *args],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-3000:] + errors[1][-3000:]


def state(out):
    return TrainState(out).tensors("model")


def test_fsdp_matches_ddp_resumes_exactly_and_samples(vae, tmp_path):
    fsdp = ["train.fsdp=true", "train.activation_checkpointing=true"]
    torchrun_train_ar(vae, tmp_path / "ddp", 1)
    torchrun_train_ar(vae, tmp_path / "fsdp", 1, *fsdp)
    torchrun_two_nodes(vae, tmp_path / "hsdp", 1, "train.fsdp=hybrid")
    a, b, h = state(tmp_path / "ddp"), state(tmp_path / "fsdp"), state(tmp_path / "hsdp")
    assert a.keys() == b.keys() == h.keys()
    for k in a:  # one optimizer step, sharded, replicated or both: the same model
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
        torch.testing.assert_close(h[k], a[k], rtol=0, atol=1e-5, msg=k)

    # resumed (its sharded AdamW state and each rank's dropout RNG restored) = unbroken
    torchrun_train_ar(vae, tmp_path / "fsdp", 3, *fsdp)
    torchrun_train_ar(vae, tmp_path / "straight", 3, *fsdp)
    resumed, straight = state(tmp_path / "fsdp"), state(tmp_path / "straight")
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    rows = [json.loads(r) for r in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]

    # the public model directory is an ordinary one: it loads and samples
    rqgen("sample", "--model", tmp_path / "fsdp", "--n", 2, "--class", "3",
          "--out", tmp_path / "s.png")  # fmt: skip
    assert (tmp_path / "s.png").is_file()
    # the run without FSDP is another run: said in one line
    args = ["train-ar", "--vae", vae, "--data", "bundled:digits", "--out", tmp_path / "fsdp",
            "--steps", 4, "--device", "cpu", *AR_TINY, "train.eval_every=2"]  # fmt: skip
    r = rqgen(*args, check=False)
    assert r.returncode == 2 and "was trained with train.fsdp=True" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_sharded_state_resumes_at_another_world_size_both_ways(vae, tmp_path):
    """2 ranks -> 1 rank -> 2 ranks continues the run: each rank reads its own slices of
    the sharded state. Without randomness (no dropout, argmin codes, no condition dropout)
    the global batch is the same at any world size, so the broken run follows an unbroken
    single process to float tolerance."""
    fixed = ["train.fsdp=true", "model.dropout=0", "train.stochastic_codes=false",
             "train.cond_dropout=0", "train.eval_every=2"]  # fmt: skip
    broken, straight = tmp_path / "broken", tmp_path / "straight"
    single = lambda out, steps: rqgen("train-ar", "--vae", vae, "--data", "bundled:digits",  # noqa: E731
                                      "--out", out, "--steps", steps, "--device", "cpu",
                                      *AR_TINY, *fixed)  # fmt: skip
    torchrun_train_ar(vae, broken, 2, *fixed)
    single(broken, 3)  # 2 -> 1
    torchrun_train_ar(vae, broken, 4, *fixed)  # 1 -> 2
    single(straight, 4)
    rows = lambda out: [r for r in metrics_rows(out) if "loss" in r]  # noqa: E731
    assert [r["step"] for r in rows(broken)] == [1, 2, 3, 4]
    for a, b in zip(rows(broken), rows(straight)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    a, b = state(broken), state(straight)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def metrics_rows(out):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_trains_a_dq_transformer(tmp_path):
    from test_dq_transformer import train_tiny_dq_vae

    vae = train_tiny_dq_vae(tmp_path / "vae")
    # bf16: FSDP2's mixed-precision policy (gathers in bf16, reduces in fp32) on gloo
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rqgen", "train-ar", "--vae", str(vae), "--data", "bundled:digits", "--out",
           str(tmp_path / "ar"), "--config", "dq-ar-tiny", "--steps", "2", "--device", "cpu",
           "model.width=32", "model.heads=2", "train.batch_size=8", "train.eval_every=2",
           "train.fsdp=true", "train.activation_checkpointing=true",
           "train.precision=bf16"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "ar" / "config.json").read_text())
    assert meta["model_type"] == "dq_transformer" and meta["step"] == 2
    rqgen("sample", "--model", tmp_path / "ar", "--n", 2, "--cfg", 2, "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").is_file()
