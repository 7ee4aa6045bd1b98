"""deca-p2p: peer-to-peer full-parameter LLM fine-tuning with DECA (decentralized block-wise Adam)."""

__version__ = "0.1.0"
