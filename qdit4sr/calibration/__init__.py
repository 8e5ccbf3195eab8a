"""Quantization core: Hadamard rotation, weight quantizer, H-SVD, VaSMP, activation statistics, VaTMP, bit plan."""
