"""Fused router: logits, softmax, top-k and renormalised weights in one kernel."""

from .router_topk import MAX_EXPERTS, fused_router_topk

__all__ = ["MAX_EXPERTS", "fused_router_topk"]
