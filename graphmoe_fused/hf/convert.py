"""`apply_graphmoe`: converts a Hugging Face decoder-only model (LLaMA, Mistral, Qwen2...) in place.

Every decoder layer's LLaMA-style ``mlp`` (``gate_proj``/``up_proj``/``down_proj`` bias-free
``nn.Linear`` and a SiLU ``act_fn``) becomes a :class:`GraphMoEMLP` sharing the base weights; with
``config.attention_lora`` the attention projections get :class:`LoRALinear` adapters. Everything
else is frozen. Only stable public ``torch.nn`` / HF APIs are used (``named_modules``, forward
hooks, ``PretrainedConfig`` attributes), so it works across transformers releases.
"""

from __future__ import annotations

from torch import nn

from ..config import GraphMoEConfig
from ..layer import GraphMoEMLP, is_silu
from .attention_lora import LoRALinear
from .hooks import install_routing_hooks

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Where a converted model keeps its GraphMoEConfig (the object, and a dict in model.config).
CONFIG_ATTRIBUTE = "graphmoe_config"


def find_decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` of every decoder layer: each element of an ``nn.ModuleList``
    whose elements all hold an ``mlp`` module (``model.layers`` in LLaMA, ``h`` in GPT-2, ...).

    Raises:
        TypeError: no such list exists in ``model``.
    """
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            isinstance(getattr(child, "mlp", None), nn.Module) for child in module
        ):
            prefix = f"{name}." if name else ""
            layers.extend((f"{prefix}{i}", child) for i, child in enumerate(module))
    if not layers:
        raise TypeError(
            f"{type(model).__name__} has no decoder layers to convert: apply_graphmoe looks for an "
            "nn.ModuleList of layers that each hold an `mlp` module (as LLaMA's model.layers)"
        )
    return layers


def graphmoe_layers(model: nn.Module) -> dict[str, GraphMoEMLP]:
    """Every :class:`GraphMoEMLP` in ``model`` by qualified module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GraphMoEMLP)}


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` already holds GraphMoE layers."""
    return any(isinstance(m, GraphMoEMLP) for m in model.modules())


def _check_mlp(name: str, mlp: nn.Module, peft_layers: dict[str, str]) -> None:
    wrapped = [n for n in (name, *(f"{name}.{p}" for p in MLP_PROJECTIONS)) if n in peft_layers]
    if wrapped:
        raise TypeError(
            f"{wrapped[0]} is wrapped by PEFT, but GraphMoE replaces the MLP and computes its "
            "experts from the bare gate/up/down projections: leave the MLP out of the PEFT "
            "config's target_modules and modules_to_save"
        )
    for proj in MLP_PROJECTIONS:
        linear = getattr(mlp, proj, None)
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"{name} ({type(mlp).__name__}) is not a LLaMA-style SwiGLU MLP: it has no "
                f"nn.Linear {proj!r} (needs gate_proj, up_proj, down_proj and a SiLU act_fn)"
            )
        if linear.bias is not None:
            raise ValueError(
                f"{name}.{proj} has a bias; GraphMoE supports bias-free SwiGLU MLPs only"
            )
    act = getattr(mlp, "act_fn", None)
    if act is None or not is_silu(act):
        raise ValueError(f"{name}.act_fn is {act!r}; GraphMoE needs a SiLU (SwiGLU) MLP")


def _attention_projections(name: str, layer: nn.Module,
                           peft_layers: dict[str, str]) -> list[tuple[nn.Module, str]]:
    wrapped = [f"{name}.self_attn.{p}" for p in ATTENTION_PROJECTIONS
               if f"{name}.self_attn.{p}" in peft_layers]
    if wrapped:
        raise TypeError(
            f"{wrapped[0]} already has a PEFT adapter: pass a GraphMoEConfig with "
            "attention_lora=False and let PEFT adapt the attention"
        )
    attn = getattr(layer, "self_attn", None)
    found = [(attn, p) for p in ATTENTION_PROJECTIONS
             if attn is not None and isinstance(getattr(attn, p, None), nn.Linear)]
    if len(found) != len(ATTENTION_PROJECTIONS):
        raise TypeError(
            f"{name} has no self_attn with nn.Linear {', '.join(ATTENTION_PROJECTIONS)}; "
            "pass a GraphMoEConfig with attention_lora=False to convert the MLPs only"
        )
    return found


def apply_graphmoe(model: nn.Module, config: GraphMoEConfig | None = None) -> nn.Module:
    """Converts ``model`` to GraphMoE in place and returns it.

    Each decoder layer's ``mlp`` becomes ``GraphMoEMLP.from_mlp(mlp, config)`` (base weights
    shared); with ``config.attention_lora`` the ``q/k/v/o_proj`` of ``self_attn`` become
    :class:`LoRALinear` (rank ``attention_lora_r or lora_r``, alpha ``attention_lora_alpha or
    lora_alpha``, dropout ``lora_dropout``). All other parameters are frozen. One
    :class:`~graphmoe_fused.hf.aux_loss.RoutingRecorder` is shared by the layers and driven by hooks
    on ``model`` (see :mod:`graphmoe_fused.hf.hooks`): outputs gain ``aux_loss`` and, with
    ``labels``, ``loss`` gains ``router_aux_loss_coef · aux_loss``. Works on meta-device models.

    PEFT, in either order: on a ``peft.PeftModel`` the model it wraps is converted, PEFT's choice
    of trainable parameters is kept (its adapters keep training) and the ``PeftModel`` is
    prepared with :func:`~graphmoe_fused.prepare_peft_model` (GraphMoE tensors trainable and
    saved by its ``save_pretrained``). PEFT must not target the MLP projections (GraphMoE
    replaces the MLP), nor the attention projections unless ``attention_lora=False``.

    Everything is checked before anything is changed, so a failed call leaves ``model`` as it was.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, has no decoder layers, or a layer's MLP or
            attention lacks the expected ``nn.Linear`` projections; or PEFT wraps an MLP, or an
            attention projection while ``attention_lora``.
        ValueError: an MLP is biased or not SiLU-gated, or ``model`` is already converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_graphmoe expects an nn.Module, got {type(model).__name__}")
    if config is None:
        config = GraphMoEConfig()
    if not isinstance(config, GraphMoEConfig):
        raise TypeError(f"config must be a GraphMoEConfig, got {type(config).__name__}")
    if is_converted(model) or any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already converted to GraphMoE")
    from .adapters import is_peft_model, peft_wrapper_names, unwrap_peft

    # A PeftModel is converted inside: the HF model it wraps gets the layers, the hooks and the
    # config attribute, exactly as when PEFT wraps a converted model.
    target = unwrap_peft(model)
    peft_layers = peft_wrapper_names(target)
    layers = find_decoder_layers(target)
    attention = []
    for name, layer in layers:
        _check_mlp(f"{name}.mlp", layer.mlp, peft_layers)
        if config.attention_lora:
            attention.extend(_attention_projections(name, layer, peft_layers))
    for _, layer in layers:
        # Validates the hidden size against the GRU ratio too (dh = 0 raises before any change).
        config.gru_hidden_size(layer.mlp.gate_proj.in_features)

    if not peft_layers:
        target.requires_grad_(False)
    # else PEFT has frozen the base already and chose what trains (its adapters, modules_to_save,
    # biases): freezing everything again would leave its adapters with nothing to train.
    for _, layer in layers:
        layer.mlp = GraphMoEMLP.from_mlp(layer.mlp, config)
    r = config.attention_lora_r or config.lora_r
    alpha = config.attention_lora_alpha or config.lora_alpha
    for attn, proj in attention:
        setattr(attn, proj, LoRALinear(getattr(attn, proj), r, alpha, config.lora_dropout))

    setattr(target, CONFIG_ATTRIBUTE, config)
    hf_config = getattr(target, "config", None)
    if hf_config is not None and not isinstance(hf_config, GraphMoEConfig):
        # A plain dict so that save_pretrained's config.json records how the model was converted.
        setattr(hf_config, CONFIG_ATTRIBUTE, config.to_dict())
        # Outputs gain aux_loss; Trainer's evaluate/predict would return it beside the logits
        # as predictions (a tuple compute_metrics does not expect) unless told to leave it out.
        ignored = list(getattr(hf_config, "keys_to_ignore_at_inference", None) or [])
        if "aux_loss" not in ignored:
            hf_config.keys_to_ignore_at_inference = [*ignored, "aux_loss"]
    install_routing_hooks(target, [name for name, _ in layers], config)
    if is_peft_model(model):
        from .pretrained import prepare_peft_model

        prepare_peft_model(model)
    return model
