"""The residual quantizer (Eq. 3-5, 7, 15), shared by RQ-VAE and DQ-VAE."""

from rqgen.quantize.residual import QuantizerOutput, ResidualQuantizer

__all__ = ["QuantizerOutput", "ResidualQuantizer"]
