"""The stage-1 loss (paper §3.1, Eq. 6-7, with VQGAN's perceptual and adversarial terms) and
its building blocks: LPIPS, the PatchGAN discriminator, hinge losses, the adaptive weight.

`Stage1Loss` is the composition, in one place (as LlamaGen's `VQLoss`); the trainer only
calls it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rqgen.errors import CheckpointError

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_FILE = "vgg.pth"
LPIPS_LIN_URL = (
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
)

# ---------------------------------------------------------------------------- weight files


def weight_search_dirs() -> list[Path]:
    """Where pretrained files are looked for: each dir in $RQGEN_WEIGHTS, then the hub cache."""
    dirs = [
        Path(p).expanduser() for p in os.environ.get("RQGEN_WEIGHTS", "").split(os.pathsep) if p
    ]
    # torch.hub.get_dir() honours $TORCH_HOME: torchvision and torch-fidelity cache files here.
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_weight_file(names: Sequence[str], extra_dirs: Iterable[Path] = ()) -> Path | None:
    """First existing file called one of `names` in the search dirs (then `extra_dirs`)."""
    for d in [*weight_search_dirs(), *extra_dirs]:
        for name in names:
            if (d / name).is_file():
                return d / name
    return None


def _lpips_package_dirs() -> list[Path]:
    # The `lpips` pip package ships the linear heads; locate it without importing it (its import
    # pulls in torchvision, which is not installable next to our torch).
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return []
    return [Path(spec.origin).parent / "weights" / "v0.1"]


def _resolve(path: str | Path | None, name: str, url: str, arg: str, extra: list[Path]) -> Path:
    if path is not None:
        if not Path(path).is_file():
            raise CheckpointError(
                f"LPIPS weight file {path} ({arg}) does not exist; download {name} from {url}, "
                "or set perceptual_weight=0 to train without LPIPS"
            )
        return Path(path)
    found = find_weight_file([name], extra)
    if found is None:
        where = ", ".join(str(d) for d in [*weight_search_dirs(), *extra])
        raise CheckpointError(
            f"LPIPS needs {name}, not found in [{where}]; download it from {url} into "
            f"$RQGEN_WEIGHTS or the torch hub cache (or pass {arg}=...), "
            "or set perceptual_weight=0 to train without LPIPS"
        )
    return found


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated/pickled-object files all mean "wrong file"
        raise CheckpointError(f"cannot read weight file {path}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(
            f"weight file {path} holds a {type(state).__name__}, not a state dict"
        )
    return state


# ---------------------------------------------------------------------------- LPIPS

# torchvision's vgg16().features layout: channels of each conv, "M" = 2x2 max-pool. Building the
# same Sequential keeps its indices, so `features.N.weight` keys load unchanged.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)  # ends at relu5_3 (index 29): later layers are unused


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG16) perceptual distance for images in [-1, 1]; always frozen and in eval.

    `LPIPS()` has random weights (useful for shapes/tests); use `LPIPS.from_pretrained()` for the
    real metric.
    """

    def __init__(self) -> None:
        super().__init__()
        # LPIPS' ScalingLayer: maps [-1,1] inputs to roughly ImageNet-normalised ones.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = _vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        for head, c in zip(self.heads, _TAP_CHANNELS):
            nn.init.constant_(head.weight, 1.0 / c)  # non-negative, like trained heads
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode: LPIPS is a fixed metric, never trained here."""
        return super().train(False)

    @classmethod
    def from_pretrained(
        cls, vgg_path: str | Path | None = None, lin_path: str | Path | None = None
    ) -> LPIPS:
        """Load torchvision's vgg16-397923af.pth and LPIPS v0.1 vgg.pth (searched when None)."""
        vgg_file = _resolve(vgg_path, VGG16_FILE, VGG16_URL, "vgg_path", [])
        lin_file = _resolve(
            lin_path, LPIPS_LIN_FILE, LPIPS_LIN_URL, "lin_path", _lpips_package_dirs()
        )
        model = cls()
        model.load_vgg(_load_state(vgg_file), vgg_file)
        model.load_heads(_load_state(lin_file), lin_file)
        return model

    def load_vgg(self, state: dict[str, torch.Tensor], source: str | Path = "state dict") -> None:
        """Copy `features.*` tensors of a torchvision VGG16 state dict (classifier keys ignored)."""
        own = {k: v for k, v in state.items() if k.startswith("features.")}
        self._copy(own, {f"features.{k}": p for k, p in self.features.state_dict().items()}, source)

    def load_heads(self, state: dict[str, torch.Tensor], source: str | Path = "state dict") -> None:
        """Copy LPIPS linear heads (keys `lin{i}.model.1.weight`; index 0 was a Dropout)."""
        targets = {f"lin{i}.model.1.weight": h.weight for i, h in enumerate(self.heads)}
        self._copy({k: v for k, v in state.items() if k.startswith("lin")}, targets, source)
        if any((h.weight < 0).any() for h in self.heads):
            raise CheckpointError(f"{source}: LPIPS heads must be non-negative; wrong file?")

    @staticmethod
    def _copy(
        state: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], source: str | Path
    ) -> None:
        missing = sorted(set(targets) - set(state))
        if missing:
            raise CheckpointError(
                f"{source}: missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}"
            )
        for k, dst in targets.items():
            if state[k].shape != dst.shape:
                raise CheckpointError(
                    f"{source}: {k} has shape {tuple(state[k].shape)}, expected {tuple(dst.shape)}"
                )
        with torch.no_grad():
            for k, dst in targets.items():
                dst.copy_(state[k])

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, reduction: Literal["none", "mean"] = "none"
    ) -> torch.Tensor:
        """Distance between image batches x, y (B,3,H,W) in [-1,1]: shape (B,), or a scalar mean."""
        n = x.shape[0]
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)  # one pass for both batches
        dist = x.new_zeros(n)
        heads = iter(self.heads)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                # unit-normalise over channels (eps as in LPIPS), squared diff, weighted channel sum
                f = h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                dist = dist + next(heads)((f[:n] - f[n:]).pow(2)).mean(dim=(1, 2, 3))
        return dist.mean() if reduction == "mean" else dist


# ---------------------------------------------------------------------------- discriminator


class NLayerDiscriminator(nn.Module):
    """PatchGAN of pix2pix / VQGAN: one real/fake logit per overlapping patch."""

    def __init__(
        self, in_channels: int = 3, ndf: int = 64, n_layers: int = 2, use_batchnorm: bool = True
    ) -> None:
        super().__init__()

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if use_batchnorm else nn.Identity()

        bias = not use_batchnorm  # a bias right before BatchNorm is redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ndf
        for n in range(1, n_layers + 1):
            c_out = ndf * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps resolution
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=bias), norm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,C,H,W) images -> (B,1,h,w) patch logits."""
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # DCGAN-style init used by pix2pix/VQGAN; the GAN balance was tuned with it.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------- GAN losses


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator loss: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """VQGAN's GAN weight ||d rec/d W|| / (||d g/d W|| + 1e-4) at the decoder's last weight W.

    Balances both gradients at the output layer; detached, so it acts as a constant.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


def adopt_weight(weight: float, step: int, start: int) -> float:
    """`weight` from step `start` on, else 0 (the GAN waits until reconstructions are sane)."""
    return weight if step >= start else 0.0


class Stage1Loss(nn.Module):
    """L = ||X - X̂||² + λ_p·LPIPS(X, X̂) + β Σ_d ||Z - sg[Ẑ(d)]||² (Eq. 6-7) [+ the DQ
    router's budget loss] [+ w·λ_adv·L_G once the discriminator has started, w VQGAN's
    adaptive weight at the decoder's last layer]; the discriminator's hinge loss apart.

    The generator term sees the discriminator `disc` itself, frozen, so that under DDP its
    gradients never reach the discriminator's reducer; `discriminator_loss` takes whatever
    module trains it (its DDP wrapper)."""

    def __init__(
        self,
        perceptual_weight: float,
        adversarial_weight: float,
        lpips: LPIPS | None,
        disc: nn.Module | None,
    ):
        super().__init__()
        self.perceptual_weight, self.adversarial_weight = perceptual_weight, adversarial_weight
        self.lpips, self.disc = lpips, disc

    def forward(
        self, x: torch.Tensor, out, last_layer: torch.Tensor, adversarial: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached parts) of a model output `out` (reconstruction, commitment_loss,
        and for DQ-VAE budget_loss / fine_mask) for the images `x`."""
        xr = out.reconstruction.float()
        rec = F.mse_loss(xr, x)  # Eq. 6, ||X - X̂||²
        nll, parts = rec, {"rec": rec.detach()}
        if self.lpips is not None:
            p = self.lpips(xr, x).mean()
            nll = nll + self.perceptual_weight * p
            parts["lpips"] = p.detach()
        loss = nll + out.commitment_loss  # + β Σ_d ||Z - sg[Ẑ(d)]||² (Eq. 7)
        if hasattr(out, "budget_loss"):  # DQ-VAE's learned router (0 for the entropy one)
            loss = loss + out.budget_loss
            parts |= {
                "budget": out.budget_loss.detach(),
                "fine_fraction": out.fine_mask.detach().float().mean(),
            }
        if adversarial:
            self.disc.requires_grad_(False)
            g_loss = generator_adv_loss(self.disc(xr))
            w = adaptive_weight(nll, g_loss, last_layer) * self.adversarial_weight
            loss = loss + w * g_loss
            parts |= {"g_loss": g_loss.detach(), "adaptive_w": w}
        parts |= {"commit": out.commitment_loss.detach(), "loss": loss.detach()}
        return loss, parts

    def discriminator_loss(
        self, disc: nn.Module, x: torch.Tensor, xr: torch.Tensor
    ) -> torch.Tensor:
        """Hinge loss of the discriminator on real `x` and detached reconstructions `xr`."""
        self.disc.requires_grad_(True)
        return hinge_d_loss(disc(x), disc(xr.detach()))
