"""Benchmark model families for tvm_autochunk: GPT, ViT, Evoformer and diffusion-UNet blocks.

Each factory returns a :class:`Workload`: a seeded, fp32, eval-mode ``torch.nn.Module`` plus
example inputs whose activation memory grows with ``size`` (sequence length, token count,
residue count or latent side). Every model imports through ``torch.export`` +
``tvm.relax.frontend.torch.from_exported_program`` and runs on llvm with results equal to torch.

The models deliberately avoid ops that TVM 0.27's torch importer rejects (``index_put``,
``unfold``, ``scatter_add``; see ``/work/shared/notes/tvm-0.27.md`` section 2).

Sizes: ``SMALL_SIZES`` are tiny sizes for fast CPU tests; ``SIZES`` is the benchmark sweep.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "SIZES",
    "SMALL_SIZES",
    "Workload",
    "evoformer",
    "gpt",
    "unet",
    "vit",
    "workload",
]


@dataclass(frozen=True, eq=False)
class Workload:
    """A model instance and its example inputs.

    ``family`` is a key of :data:`FAMILIES`; ``size`` is the family's scaling parameter
    (GPT: sequence length, ViT: patch tokens, Evoformer: residues N, UNet: latent side px).
    """

    family: str
    size: int
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    description: str


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _finish(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter (norm affines too) from a private generator; eval mode, fp32."""
    gen = _seeded(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if isinstance(owner, (nn.LayerNorm, nn.GroupNorm)):
                # Perturb around the identity so the affine parameters are exercised.
                base = 1.0 if leaf == "weight" else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return module.float().eval()


# --------------------------------------------------------------------------------------------
# GPT-2-style decoder
# --------------------------------------------------------------------------------------------


class GPTBlock(nn.Module):
    """Pre-LN decoder block: fused qkv, causal SDPA, output projection, GELU-tanh MLP (4x)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"gpt: d={d} is not divisible by heads={heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.reshape(b, s, self.heads, hd).transpose(1, 2)
        k = k.reshape(b, s, self.heads, hd).transpose(1, 2)
        v = v.reshape(b, s, self.heads, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """A stack of :class:`GPTBlock` and a final LayerNorm over float embeddings (batch, S, d)."""

    def __init__(self, d: int, heads: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x)


def gpt(
    S: int, d: int = 256, heads: int = 4, layers: int = 2, batch: int = 1, *, seed: int = 0
) -> Workload:
    """GPT-2-style decoder on float embeddings ``x`` of shape (batch, S, d)."""
    if S < 1 or batch < 1:
        raise ValueError(f"gpt: S and batch must be >= 1, got S={S}, batch={batch}")
    module = _finish(GPT(d, heads, layers), seed)
    x = torch.randn(batch, S, d, generator=_seeded(seed + 1))
    desc = f"GPT-2 pre-LN decoder, {layers} layers, d={d}, {heads} heads, causal, S={S}"
    return Workload("gpt", S, module, (x,), desc)


# --------------------------------------------------------------------------------------------
# ViT encoder
# --------------------------------------------------------------------------------------------


class ViTBlock(nn.Module):
    """Pre-LN encoder block: fused qkv, non-causal SDPA, output projection, GELU (erf) MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"vit: d={d} is not divisible by heads={heads}")
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        hd = d // self.heads
        qkv = self.qkv(self.ln1(x)).reshape(b, s, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class ViT(nn.Module):
    """Conv2d patch embedding + cls token + learned position embedding + encoder blocks."""

    def __init__(self, tokens: int, d: int, heads: int, layers: int, patch: int):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, d))
        self.blocks = nn.ModuleList(ViTBlock(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(img).flatten(2).transpose(1, 2)  # (B, tokens, d)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def vit(
    tokens: int, d: int = 192, heads: int = 3, layers: int = 2, *, patch: int = 16, seed: int = 0
) -> Workload:
    """ViT encoder on a (1, 3, side, side) image with ``tokens`` patches, side = sqrt(tokens)*patch.

    Raises ``ValueError`` if ``tokens`` is not a positive perfect square.
    """
    side_patches = math.isqrt(tokens) if tokens > 0 else 0
    if tokens < 1 or side_patches * side_patches != tokens:
        raise ValueError(
            f"vit: tokens={tokens} is not a positive perfect square; the patch grid is square, "
            f"so use e.g. {max(1, side_patches) ** 2} or {(side_patches + 1) ** 2}"
        )
    side = side_patches * patch
    module = _finish(ViT(tokens, d, heads, layers, patch), seed)
    img = torch.randn(1, 3, side, side, generator=_seeded(seed + 1))
    desc = (
        f"ViT encoder, {layers} layers, d={d}, {heads} heads, {tokens} patch tokens + cls "
        f"({side}x{side} image, patch {patch})"
    )
    return Workload("vit", tokens, module, (img,), desc)


# --------------------------------------------------------------------------------------------
# Evoformer pair stack
# --------------------------------------------------------------------------------------------


class TriangleMultiplicationOutgoing(nn.Module):
    """z_ij += g_ij * W LN(sum_k a_ik * b_jk), with gated projections a and b."""

    def __init__(self, c_z: int, c_hidden: int):
        super().__init__()
        self.ln_in = nn.LayerNorm(c_z)
        self.a_proj = nn.Linear(c_z, c_hidden)
        self.a_gate = nn.Linear(c_z, c_hidden)
        self.b_proj = nn.Linear(c_z, c_hidden)
        self.b_gate = nn.Linear(c_z, c_hidden)
        self.ln_out = nn.LayerNorm(c_hidden)
        self.out_proj = nn.Linear(c_hidden, c_z)
        self.out_gate = nn.Linear(c_z, c_z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zn = self.ln_in(z)
        a = torch.sigmoid(self.a_gate(zn)) * self.a_proj(zn)
        b = torch.sigmoid(self.b_gate(zn)) * self.b_proj(zn)
        x = torch.einsum("bikc,bjkc->bijc", a, b)
        x = self.out_proj(self.ln_out(x))
        return z + torch.sigmoid(self.out_gate(zn)) * x


class TriangleAttentionStartingNode(nn.Module):
    """Row-wise gated attention over the last residue axis with a pair bias from z."""

    def __init__(self, c_z: int, heads: int, c_hidden: int):
        super().__init__()
        self.heads = heads
        self.c_hidden = c_hidden
        self.ln = nn.LayerNorm(c_z)
        self.q = nn.Linear(c_z, heads * c_hidden, bias=False)
        self.k = nn.Linear(c_z, heads * c_hidden, bias=False)
        self.v = nn.Linear(c_z, heads * c_hidden, bias=False)
        self.bias = nn.Linear(c_z, heads, bias=False)
        self.gate = nn.Linear(c_z, heads * c_hidden)
        self.out = nn.Linear(heads * c_hidden, c_z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n_i, n_j, _ = z.shape
        h, c = self.heads, self.c_hidden
        zn = self.ln(z)
        # (b, i, j, h, c) -> (b, i, h, j, c)
        q = self.q(zn).reshape(b, n_i, n_j, h, c).permute(0, 1, 3, 2, 4)
        k = self.k(zn).reshape(b, n_i, n_j, h, c).permute(0, 1, 3, 2, 4)
        v = self.v(zn).reshape(b, n_i, n_j, h, c).permute(0, 1, 3, 2, 4)
        # pair bias b_h(j, k) from z_jk, shared by every row i: (b, 1, h, j, k)
        pair_bias = self.bias(zn).permute(0, 3, 1, 2).unsqueeze(1)
        logits = torch.matmul(q * (1.0 / math.sqrt(c)), k.transpose(-1, -2)) + pair_bias
        o = torch.matmul(torch.softmax(logits, dim=-1), v)  # (b, i, h, j, c)
        o = o.permute(0, 1, 3, 2, 4).reshape(b, n_i, n_j, h * c)
        o = torch.sigmoid(self.gate(zn)) * o
        return z + self.out(o)


class PairTransition(nn.Module):
    """z += W2 relu(W1 LN(z)), hidden width 4*c_z."""

    def __init__(self, c_z: int, factor: int = 4):
        super().__init__()
        self.ln = nn.LayerNorm(c_z)
        self.fc1 = nn.Linear(c_z, factor * c_z)
        self.fc2 = nn.Linear(factor * c_z, c_z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.fc2(torch.relu(self.fc1(self.ln(z))))


class EvoformerPairBlock(nn.Module):
    """Triangle multiplication (outgoing) -> triangle attention (starting node) -> transition."""

    def __init__(self, c_z: int, heads: int, c_hidden: int):
        super().__init__()
        self.tri_mul_out = TriangleMultiplicationOutgoing(c_z, c_hidden)
        self.tri_att_start = TriangleAttentionStartingNode(c_z, heads, c_hidden)
        self.transition = PairTransition(c_z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self.tri_mul_out(z)
        z = self.tri_att_start(z)
        return self.transition(z)


def evoformer(
    N: int, c_z: int = 64, heads: int = 4, c_hidden: int = 32, *, seed: int = 0
) -> Workload:
    """Evoformer-style pair block on a pair representation z of shape (1, N, N, c_z)."""
    if N < 1:
        raise ValueError(f"evoformer: N must be >= 1, got {N}")
    module = _finish(EvoformerPairBlock(c_z, heads, c_hidden), seed)
    z = torch.randn(1, N, N, c_z, generator=_seeded(seed + 1))
    desc = (
        f"Evoformer pair block (tri-mul outgoing, tri-attention starting node, transition), "
        f"N={N}, c_z={c_z}, {heads} heads x {c_hidden}"
    )
    return Workload("evoformer", N, module, (z,), desc)


# --------------------------------------------------------------------------------------------
# Diffusion UNet block
# --------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv3x3 -> GroupNorm -> SiLU -> Conv3x3, plus identity skip."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class PixelAttention(nn.Module):
    """Single-head self-attention over all px*px pixels (1x1 conv q/k/v/out projections)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b, 1, h*w, c)
            return t.reshape(b, c, hh * ww).transpose(1, 2).unsqueeze(1)

        y = F.scaled_dot_product_attention(
            tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn))
        )
        y = y.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.out(y)


class UNetBlock(nn.Module):
    """ResBlock + pixel attention at full size, stride-2 down, ResBlock, nearest up, skip concat."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.res_in = ResBlock(ch, groups)
        self.attn = PixelAttention(ch, groups)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.res_mid = ResBlock(ch, groups)
        self.up_conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.merge = nn.Conv2d(2 * ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.attn(self.res_in(x))
        h = self.res_mid(self.down(skip))
        h = self.up_conv(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.merge(torch.cat([h, skip], dim=1))


def unet(px: int, ch: int = 64, groups: int = 8, *, seed: int = 0) -> Workload:
    """Diffusion-UNet-style block on a latent of shape (1, ch, px, px); px must be even."""
    if px < 2 or px % 2:
        raise ValueError(f"unet: px must be an even number >= 2 (stride-2 down, 2x up), got {px}")
    if ch % groups:
        raise ValueError(f"unet: ch={ch} is not divisible by groups={groups}")
    module = _finish(UNetBlock(ch, groups), seed)
    x = torch.randn(1, ch, px, px, generator=_seeded(seed + 1))
    desc = (
        f"diffusion UNet block, ch={ch}, GroupNorm({groups}), self-attention over "
        f"{px * px} pixels, latent {px}x{px}"
    )
    return Workload("unet", px, module, (x,), desc)


FAMILIES: dict[str, Callable[..., Workload]] = {
    "gpt": gpt,
    "vit": vit,
    "evoformer": evoformer,
    "unet": unet,
}

SMALL_SIZES: dict[str, int] = {"gpt": 64, "vit": 64, "evoformer": 16, "unet": 16}

SIZES: dict[str, list[int]] = {
    "gpt": [512, 1024, 2048, 4096],
    "vit": [256, 576, 1024, 2304],
    "evoformer": [64, 128, 192, 256],
    "unet": [32, 64, 96, 128],
}


def workload(family: str, size: int, **kw) -> Workload:
    """``family``'s model at ``size``: one of :data:`FAMILIES`, or a library model of
    ``benchmarks.real_models`` (``hf_*``; needs the ``bench`` extra)."""
    if family in FAMILIES:
        return FAMILIES[family](size, **kw)
    from benchmarks.real_models import REAL_FAMILIES  # transformers/diffusers: only on demand

    if family not in REAL_FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {[*FAMILIES, *REAL_FAMILIES]}")
    return REAL_FAMILIES[family](size, **kw)
