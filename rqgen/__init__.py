"""rqgen: RQ-VAE + RQ-Transformer (Lee et al., CVPR 2022) and DQ-VAE + DQ-Transformer.

from rqgen import ResidualQuantizer, RQVAE, RQTransformer, DQVAE, DQTransformer
from rqgen import RQPipeline  # sampling: RQPipeline.from_pretrained("runs/ar")(class_labels=[3])
"""

from rqgen.pipeline import PipelineOutput, RQPipeline
from rqgen.quantize import ResidualQuantizer
from rqgen.stage1.dqvae import DQVAE, DQVAEConfig
from rqgen.stage1.rqvae import RQVAE, RQVAEConfig
from rqgen.stage2.dq_transformer import DQTransformer, DQTransformerConfig
from rqgen.stage2.rq_transformer import RQTransformer, RQTransformerConfig

__all__ = [
    "PipelineOutput",
    "RQPipeline",
    "DQVAE",
    "DQVAEConfig",
    "DQTransformer",
    "DQTransformerConfig",
    "RQVAE",
    "RQVAEConfig",
    "RQTransformer",
    "RQTransformerConfig",
    "ResidualQuantizer",
]
__version__ = "0.1.0"
