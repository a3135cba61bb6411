"""Plain-PyTorch specifications of fastvq's ops: readable, any floating dtype, used as test oracles
and as the `backend="torch"` fallback."""

from fastvq.reference.nearest_code import (
    METRICS,
    code_terms,
    inv_norm,
    nearest_code,
    nearest_code_scores,
    nearest_code_topk,
    topk_scores,
)

__all__ = [
    "METRICS",
    "code_terms",
    "inv_norm",
    "nearest_code",
    "nearest_code_scores",
    "nearest_code_topk",
    "topk_scores",
]
