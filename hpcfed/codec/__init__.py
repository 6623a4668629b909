"""Gradient codec: block DCT, shared compression kernel, quantization, error feedback (pure xp code)."""

from hpcfed.codec.buffers import BufferCoding
from hpcfed.codec.codec import CompressionSettings, GradientCodec

__all__ = ["BufferCoding", "CompressionSettings", "GradientCodec"]
