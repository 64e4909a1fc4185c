"""Models from the libraries users run: transformers GPT2, BERT, Llama and ViT; diffusers
UNet2DModel and UNet2DConditionModel. Tiny random-init configs (nothing is downloaded), fp32,
eval mode, each wrapped so that ``forward`` takes tensors and returns one tensor.

They need the ``bench`` extra (``pip install -e '.[bench]'``); the packages are imported only
when a factory is called. Sizes: sequence length for the text models, image side in pixels
for ViT (patch 8: ``(px/8)**2 + 1`` tokens with the CLS token) and the UNets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from benchmarks.models import Workload

__all__ = ["REAL_FAMILIES", "REAL_SIZES", "REAL_SMALL_SIZES"]

VOCAB = 1000


class _Out(nn.Module):
    """``model(**{name: x})`` and one output tensor (``last_hidden_state`` or ``sample``)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], field: str, **fixed):
        super().__init__()
        self.model, self.names, self.field, self.fixed = model, names, field, fixed

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, xs)), **self.fixed)
        return getattr(out, self.field)


def _make(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    # transformers and diffusers draw their init from the global generator: fork it
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().float().eval()


def _ids(s: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, s), generator=torch.Generator().manual_seed(seed + 1))


def _text(family: str, s: int, seed: int, build: Callable[[], nn.Module], desc: str) -> Workload:
    module = _Out(_make(build, seed), ("input_ids",), "last_hidden_state")
    return Workload(family, s, module.eval(), (_ids(s, seed),), desc)


def hf_gpt2(s: int, *, layers: int = 2, d: int = 128, seed: int = 0) -> Workload:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(n_embd=d, n_layer=layers, n_head=4, n_positions=s, vocab_size=VOCAB,
                     use_cache=False)
    return _text("hf_gpt2", s, seed, lambda: GPT2Model(cfg),
                 f"transformers GPT2Model, {layers} layers, d={d}, 4 heads, S={s}")


def hf_bert(s: int, *, layers: int = 2, d: int = 128, seed: int = 0) -> Workload:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=4 * d, max_position_embeddings=s, vocab_size=VOCAB)
    return _text("hf_bert", s, seed, lambda: BertModel(cfg, add_pooling_layer=False),
                 f"transformers BertModel, {layers} layers, d={d}, 4 heads, S={s}")


def hf_llama(s: int, *, layers: int = 2, d: int = 128, seed: int = 0) -> Workload:
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=344, max_position_embeddings=s,
                      vocab_size=VOCAB, use_cache=False)
    return _text("hf_llama", s, seed, lambda: LlamaModel(cfg),
                 f"transformers LlamaModel, {layers} layers, d={d}, 4 heads (2 KV), S={s}")


def hf_vit(px: int, *, layers: int = 2, d: int = 128, seed: int = 0) -> Workload:
    from transformers import ViTConfig, ViTModel

    if px % 8:
        raise ValueError(f"hf_vit: px must be a multiple of the patch size 8, got {px}")
    cfg = ViTConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                    intermediate_size=4 * d, image_size=px, patch_size=8)
    module = _Out(_make(lambda: ViTModel(cfg, add_pooling_layer=False), seed),
                  ("pixel_values",), "last_hidden_state")
    x = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(seed + 1))
    tokens = (px // 8) ** 2 + 1
    return Workload("hf_vit", px, module.eval(), (x,),
                    f"transformers ViTModel, {layers} layers, d={d}, {tokens} tokens ({px} px)")


def hf_unet(px: int, *, seed: int = 0) -> Workload:
    from diffusers import UNet2DModel

    def build():
        return UNet2DModel(
            sample_size=px, in_channels=3, out_channels=3, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        )

    module = _Out(_make(build, seed), ("sample",), "sample", timestep=10)
    x = torch.randn(1, 3, px, px, generator=torch.Generator().manual_seed(seed + 1))
    return Workload("hf_unet", px, module.eval(), (x,),
                    f"diffusers UNet2DModel, channels (32, 64), attention at {px // 2} px")


def hf_unet_cond(px: int, *, seed: int = 0) -> Workload:
    from diffusers import UNet2DConditionModel

    def build():
        return UNet2DConditionModel(
            sample_size=px, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        )

    module = _Out(_make(build, seed), ("sample", "encoder_hidden_states"), "sample",
                  timestep=10)
    gen = torch.Generator().manual_seed(seed + 1)
    x, ctx = torch.randn(1, 4, px, px, generator=gen), torch.randn(1, 77, 64, generator=gen)
    return Workload("hf_unet_cond", px, module.eval(), (x, ctx),
                    f"diffusers UNet2DConditionModel, channels (32, 64), self- and "
                    f"cross-attention at {px} px, 77 context tokens")


REAL_FAMILIES: dict[str, Callable[..., Workload]] = {
    "hf_gpt2": hf_gpt2,
    "hf_bert": hf_bert,
    "hf_llama": hf_llama,
    "hf_vit": hf_vit,
    "hf_unet": hf_unet,
    "hf_unet_cond": hf_unet_cond,
}

# the sizes of issue 22's table, and tiny ones for tests
REAL_SIZES: dict[str, int] = {"hf_gpt2": 2048, "hf_bert": 2048, "hf_llama": 2048,
                              "hf_vit": 336, "hf_unet": 64, "hf_unet_cond": 64}
REAL_SMALL_SIZES: dict[str, int] = {"hf_gpt2": 64, "hf_bert": 64, "hf_llama": 64,
                                    "hf_vit": 32, "hf_unet": 16, "hf_unet_cond": 16}
