"""rqgen: RQ-VAE + RQ-Transformer (Lee et al., CVPR 2022) and DQ-VAE + DQ-Transformer.

from rqgen import ResidualQuantizer, RQVAE
"""

from rqgen.quantize import ResidualQuantizer
from rqgen.stage1.rqvae import RQVAE, RQVAEConfig

__all__ = ["RQVAE", "RQVAEConfig", "ResidualQuantizer"]
__version__ = "0.1.0"
