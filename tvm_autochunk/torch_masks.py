"""Attention masks that are constants of the program, read before decomposition.

transformers builds its attention masks inside ``forward`` from ``arange``, cache positions and
comparisons, and passes them to ``scaled_dot_product_attention`` even when they mask nothing
(BERT, ViT: all True) or are plain causal (GPT2, Llama: ``k <= q``). Such a mask does not
depend on the inputs, so its value is known at import. Read as a mask, it keeps torch's
safe-softmax check and an S x S bias in the imported program, and hides the attention from the
fused kernel. Read as what it is (no mask, or ``is_causal``), it imports as torch's own
unmasked or causal attention.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

# masks bigger than this are not evaluated: S=16384 (a float S x S mask is 1 GiB; the mask
# chain's intermediates are freed as soon as they are read, so about three are alive)
MAX_MASK_ELEMENTS = 1 << 28


def _sdpa_mask(node) -> Any:
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _sdpa_flag(node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _constant_inputs(ep) -> dict[str, Any]:
    """Placeholder name -> tensor, for parameters, buffers and lifted constants."""
    out = {}
    for spec in ep.graph_signature.input_specs:
        target = getattr(spec, "target", None)
        if target is None:
            continue
        if target in ep.constants:
            out[spec.arg.name] = ep.constants[target]
        elif target in ep.state_dict:
            out[spec.arg.name] = ep.state_dict[target]
    return out


def _evaluate(node, torch: Any, consts: dict[str, Any], memo: dict) -> Any:
    """The value of ``node`` if it depends on no user input, else None. Ops run in torch eager,
    so the value is what the program computes; anything unusual gives up (None)."""
    import torch.fx as fx

    order, stack, seen = [], [node], set()
    while stack:  # the node's ancestors, each after its inputs (iterative: graphs are deep)
        n = stack[-1]
        if n in memo or n in seen:
            stack.pop()
            continue
        pending = [a for a in n.all_input_nodes if a not in memo and a not in seen]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        seen.add(n)
        order.append(n)
    users = {n: sum(u in seen for u in n.users) for n in order}  # readers still to run
    for n in order:
        if n.op == "placeholder":
            memo[n] = consts.get(n.name)
        elif n.op == "call_function" and not any(memo[a] is None for a in n.all_input_nodes):
            memo[n] = None  # too big to compute (at S=32768 an int64 S x S is 8 GiB)
            if not _too_big(n, torch):
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: memo[a])
                try:
                    with torch.no_grad():
                        memo[n] = n.target(*args, **kwargs)
                except Exception:  # an op that cannot run eagerly here: leave the mask alone
                    memo[n] = None
        else:
            memo[n] = None
        for a in n.all_input_nodes:  # a big intermediate of this mask is dropped once its
            if a in users:  # readers here ran (None: a later mask reading it stays a mask)
                users[a] -= 1
                if users[a] == 0 and a is not node and _big(memo[a], torch):
                    memo[a] = None
    return memo[node]


def _too_big(n, torch) -> bool:
    """Whether ``n``'s value (its traced shape) is over ``MAX_MASK_ELEMENTS``; logged."""
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    try:
        numel = int(val.numel())
    except Exception:  # a symbolic size (torch raises its own types): not a constant anyway
        return False
    if numel <= MAX_MASK_ELEMENTS:
        return False
    logger.warning(
        "an attention mask's computation (%s) has %d elements, over the %d read at import: "
        "the mask stays, its attention is not fused, and memory grows with S x S",
        n.name, numel, MAX_MASK_ELEMENTS,
    )
    return True


def _big(value, torch) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() > 1 << 20


def _read(mask: Any, q_len: int, k_len: int, torch: Any) -> str | None:
    """``"none"``, ``"causal"`` or None (a real mask) for a mask value broadcast to (q, k)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or mask.is_complex():
        return None
    if tuple(mask.shape[-2:]) not in {(q_len, k_len), (1, k_len), (q_len, 1), (1, 1)}:
        return None
    m = mask.expand(*mask.shape[:-2], q_len, k_len)
    if mask.dtype == torch.bool:
        keep = m
    elif mask.is_floating_point():
        keep = m == 0
        # a float mask reads as "none"/"causal" only if it is 0 where kept and -inf elsewhere
        if not bool(torch.all(keep | (m == float("-inf")))):
            return None
    else:
        return None
    if bool(keep.all()):
        return "none"
    tril = torch.ones(q_len, k_len, dtype=torch.bool).tril()
    if bool((keep == tril).all()):
        return "causal"
    return None


def read_constant_masks(ep, torch: Any) -> dict[Any, str]:
    """``scaled_dot_product_attention`` node -> ``"none"`` (its mask masks nothing) or
    ``"causal"`` (it is exactly ``is_causal``: key ``k`` kept for query ``q`` iff ``k <= q``),
    for the nodes of ``ep`` whose mask is such a constant."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    consts = _constant_inputs(ep)
    memo: dict = {}
    reads: dict[Any, str] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not sdpa:
            continue
        mask = _sdpa_mask(node)
        causal = bool(_sdpa_flag(node, 5, "is_causal", False))
        if mask is not None and hasattr(mask, "op") and not causal:
            value = _evaluate(mask, torch, consts, memo)
            q, k = (node.args[i].meta.get("val") for i in (0, 1))
            if value is not None and q is not None and k is not None:
                try:
                    q_len, k_len = int(q.shape[-2]), int(k.shape[-2])
                except TypeError:  # symbolic lengths: the mask is not a constant
                    q_len = k_len = None
                kind = _read(value, q_len, k_len, torch) if q_len is not None else None
                if kind is not None:
                    reads[node] = kind
                    logger.debug("SDPA %s: constant mask reads as %s", node.name, kind)
    return reads


@contextlib.contextmanager
def constant_masks_read(ep, torch: Any) -> Iterator[int]:
    """Within the block, ``ep``'s SDPA calls with a constant mask that masks nothing or is
    causal pass no mask (and ``is_causal`` for causal ones); the block gets their count. The
    program is restored on exit: decompose (``ep.run_decompositions``) inside it, which makes a
    new program, so the caller's own program is left as it was."""
    reads = read_constant_masks(ep, torch)
    saved = {node: (node.args, dict(node.kwargs)) for node in reads}
    try:
        for node, kind in reads.items():
            kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "is_causal")}
            dropout = node.args[4] if len(node.args) > 4 else kwargs.pop("dropout_p", 0.0)
            node.args = (*node.args[:3], None, dropout, kind == "causal")
            node.kwargs = kwargs
        if reads:
            ep.graph_module.recompile()
        yield len(reads)
    finally:
        for node, (args, kwargs) in saved.items():
            node.args, node.kwargs = args, kwargs
        if reads:
            ep.graph_module.recompile()
