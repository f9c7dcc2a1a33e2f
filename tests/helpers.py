"""Shared test helpers: layers with every parameter non-zero (zero LoRA B / W_g hide bugs)."""

from __future__ import annotations

import torch

import graphmoe_fused as gm


def randomize_(layer: gm.GraphMoEMLP, seed: int = 0, scale: float = 0.1) -> gm.GraphMoEMLP:
    """Fills every parameter (base weights included) with seeded normals of a moderate scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(layer.named_parameters(remove_duplicate=False)):
            fan_in = p.shape[-1]
            std = scale if name.startswith(("lora_B", "gru.bias")) else fan_in ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(std).to(p.dtype))
    return layer


def make_layer(
    hidden: int = 32, intermediate: int = 48, seed: int = 0, dtype: torch.dtype = torch.float32,
    device: str = "cpu", **cfg_kwargs,
) -> gm.GraphMoEMLP:
    """A standalone GraphMoEMLP with random non-zero weights (dropout off unless asked)."""
    cfg_kwargs.setdefault("lora_dropout", 0.0)
    cfg = gm.GraphMoEConfig(**cfg_kwargs)
    torch.manual_seed(seed)
    layer = gm.GraphMoEMLP(hidden, intermediate, cfg, dtype=dtype, device=device)
    return randomize_(layer, seed)


def imported_modules(module: str, transitive: bool = False, within: str = "graphmoe_fused"
                     ) -> set[str]:
    """The modules ``module``'s source imports, read with ``ast`` (function-level imports
    included), as absolute dotted names. ``from a.b import c`` gives ``a.b`` and ``a.b.c``
    (``c`` may be a submodule); ``from . import c`` gives only ``package.c``. With
    ``transitive``, the imports of every imported module under ``within`` are followed too. The
    parent packages' ``__init__`` that Python runs on the way to a submodule are not counted:
    they are how a submodule is reached, not something it uses."""
    import ast
    import importlib.util

    def source_of(name: str) -> str | None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, AttributeError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
        return origin if origin and origin.endswith(".py") else None

    def direct(name: str, path: str) -> set[str]:
        is_package = path.endswith("__init__.py")
        package = name if is_package else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    source = f"{base}.{node.module}" if node.module else base
                else:
                    source = node.module
                if node.module:
                    found.add(source)
                found.update(f"{source}.{alias.name}" for alias in node.names)
        return found

    seen: set[str] = set()
    todo = [module]
    result: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = source_of(name)
        if path is None:
            continue
        imports = direct(name, path)
        result |= imports
        if transitive:
            todo.extend(m for m in imports if m == within or m.startswith(within + "."))
        elif name == module:
            break
    return result
