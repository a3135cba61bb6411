"""Quantizer modules (drop-in for vector-quantize-pytorch) built on fastvq's ops."""
