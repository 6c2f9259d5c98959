"""Evaluation metrics: reconstruction quality, codebook statistics and (optional) rFID."""

from rqgen.evaluate.fid import FIDMeter, find_inception_weights, inception_fid_available
from rqgen.evaluate.recon import CodeStats, psnr, ssim

__all__ = [
    "CodeStats",
    "FIDMeter",
    "find_inception_weights",
    "inception_fid_available",
    "psnr",
    "ssim",
]
