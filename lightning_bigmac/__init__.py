"""lightning-bigmac: the BigMac nested pipeline for multimodal LLMs, as a PyTorch Lightning strategy.

Importing the package registers the strategy names ``"bigmac"`` (script / torchrun / SLURM),
``"bigmac_spawn"``, ``"bigmac_fork"`` and ``"bigmac_notebook"`` with Lightning.
"""

from .batches import Microbatches
from .checkpoint import consolidate
from .contract import check_contract, reference_loss, step_loss
from .data_state import DataPosition, StepLoader
from .run_report import RunReport
from .runtime.parts import LossWeights, PipelineParts
from .strategy import BigMacStrategy

__version__ = "0.1.0"

__all__ = [
    "BigMacStrategy",
    "DataPosition",
    "LossWeights",
    "Microbatches",
    "PipelineParts",
    "RunReport",
    "StepLoader",
    "check_contract",
    "consolidate",
    "reference_loss",
    "step_loss",
]
