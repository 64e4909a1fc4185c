"""Fused softmax attention: ``match`` finds it (analysis), ``fuse`` rewrites it into one call
of ``kernel_cpu``'s flash-style kernel (llvm targets)."""

from .fuse import FuseAttention, fuse_attention, leave_unfused
from .kernel_cpu import AttentionShape, cpu_kernel
from .match import Attention, Module, find_attention

__all__ = [
    "Attention",
    "AttentionShape",
    "FuseAttention",
    "Module",
    "cpu_kernel",
    "find_attention",
    "fuse_attention",
    "leave_unfused",
]
