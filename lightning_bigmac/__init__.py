"""lightning-bigmac: the BigMac nested pipeline for multimodal LLMs, as a PyTorch Lightning strategy."""

__version__ = "0.1.0"
