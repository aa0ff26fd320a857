"""portable-ckpt: portable, verifiable, exactly resumable PyTorch checkpoints."""
__version__ = "0.1.0"
