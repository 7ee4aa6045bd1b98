"""Where the package keeps its files, without importing torch: `cluster` needs the model's directory before it
starts the peers' fork server, and importing torch first would cost 1.3 s before that server's own import."""
from pathlib import Path

BASE_MODEL_DIR = Path(__file__).resolve().parent / "base_model"
"""The packaged pretrained base (the embedded default model); made by ``scripts/pretrain_base.py``."""
