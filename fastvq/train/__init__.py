"""Tokenizer training: config, data, metrics, checkpoints, the trainer and the command line.

Submodules are imported on demand (``fastvq.train.trainer``, ``fastvq.train.losses``, ...) so that
``import fastvq.train`` stays cheap and never touches CUDA; load_tokenizer reads a trained
tokenizer back from a checkpoint.
"""

from fastvq.train.checkpoint import load_tokenizer

__all__ = ["load_tokenizer"]
