"""Triton kernels of graphmoe_fused (installed as ``graphmoe_fused.kernels``).

Nothing here imports from ``graphmoe_fused``: the kernels take plain tensors.
"""
