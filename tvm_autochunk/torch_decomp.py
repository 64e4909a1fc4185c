"""The decompositions torch programs are imported with: torch.export's defaults, except that
``scaled_dot_product_attention`` without a mask skips torch's safe-softmax check.

The check (``_safe_softmax``) zeroes rows whose scores are all ``-inf``, which only a mask can
make. Unmasked and causal attention keep a finite score in every row (causal: the diagonal), so
there it is a no-op, and torch eager's own CPU and CUDA kernels skip it too. Kept, it costs a
full read of the S x S scores, an extra S x S buffer, and on CUDA a serial row reduction
(``any`` imports as an int8 ``max``). With a mask it stays, unless the mask is a constant that
masks nothing or is exactly causal: ``torch_masks`` passes those calls as unmasked or causal.
"""

from __future__ import annotations

import contextvars
from typing import Any

# set while one unmasked SDPA call is being decomposed (the decomposition runs nested in it)
_UNMASKED = contextvars.ContextVar("tvm_autochunk_unmasked_sdpa", default=False)


def _mask_of(args: tuple, kwargs: dict) -> Any:
    return args[3] if len(args) > 3 else kwargs.get("attn_mask")


def decomposition_table(torch: Any) -> dict:
    """``torch.export.default_decompositions()``, unmasked SDPA without the safe-softmax check."""
    from torch.export import default_decompositions

    aten = torch.ops.aten
    table = default_decompositions()
    sdpa, safe = aten.scaled_dot_product_attention.default, aten._safe_softmax.default
    if sdpa not in table or safe not in table:  # another torch: import as torch decomposes
        return table
    sdpa_default, safe_default = table[sdpa], table[safe]

    def attention(*args: Any, **kwargs: Any) -> Any:
        token = _UNMASKED.set(_mask_of(args, kwargs) is None)
        try:
            return sdpa_default(*args, **kwargs)
        finally:
            _UNMASKED.reset(token)

    def softmax(x: Any, dim: int, dtype: Any = None) -> Any:
        if _UNMASKED.get():
            return torch.softmax(x, dim=dim, dtype=dtype)
        return safe_default(x, dim, dtype)

    def cumsum(x: Any, dim: int, dtype: Any = None) -> Any:
        # torch sums bools as int64; TVM's importer keeps bool, which LLVM cannot add
        if dtype is not None or x.dtype != torch.bool:
            return NotImplemented  # not decomposed: the op as it is
        return torch.ops.aten.cumsum.default(x.to(torch.int64), dim)

    table[sdpa], table[safe] = attention, softmax
    table[aten.cumsum.default] = cumsum
    return table
