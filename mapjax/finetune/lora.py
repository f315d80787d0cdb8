"""LoRA and QLoRA adapters for every mapjax decoder, through Google's `qwix` library.

qwix intercepts the ``jnp.einsum`` of each adapted :class:`mapjax.models.layers.Linear` and adds
``alpha / rank * (x A) B`` to its output (``A`` = ``weight_lora_a`` ``[in, rank]``, ``B`` = ``weight_lora_b``
``[rank, out]``, both ``nnx.LoRAParam``; ``B`` starts at zero so a fresh adapter leaves the model unchanged). With
``quantize_base="int8" | "int4"`` the frozen base weight of each adapted layer is stored quantized (channel-wise
absmax per output row, a ``WithAux`` holding the integer ``qvalue`` and float ``scale``): QLoRA. Layers that are
not adapted (embeddings, ``lm_head``, projections outside ``targets``) keep their dtype.

- :func:`add_adapters`: an adapted copy of a model (the caller's model is left as it was);
- :func:`merge_adapters`: back to a plain model of the original class with ``W + alpha/rank (A B)^T`` folded in,
  which exports with ``export_pretrained`` like any mapjax model;
- :func:`export_peft`: the adapters in Hugging Face PEFT's format (``PeftModel.from_pretrained`` reads them over
  the base model ``export_pretrained`` wrote);
- :func:`dropout_free` and :func:`with_dropout_key`: adapter dropout off for sampling and scoring, and the key a
  training step draws its dropout masks from.

Training only the adapters, inside ``jax.jit``::

    adapted = add_adapters(model, LoraConfig(rank=8, dropout=0.05))
    graphdef, adapters, frozen = nnx.split(adapted, nnx.LoRAParam, ...)
    def loss(adapters, frozen, batch, step):
        model = with_dropout_key(nnx.merge(graphdef, adapters, frozen), jax.random.fold_in(run_key, step))
        ...
    grads = jax.jit(jax.grad(loss))(adapters, frozen, batch, step)

The dropout masks are a function of ``(run_key, step)`` alone. For sampling or reference passes merge the same
states into the graph of ``dropout_free(adapted)`` (same state structure, dropout off).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import FinetuneError
from mapjax.models.layers import Linear
from mapjax.models.layers.axes import LOGICAL_AXES

__all__ = ["QUANTIZE", "TARGETS", "LoraConfig", "adapter_parameter_count", "add_adapters", "dropout_free",
           "export_peft", "merge_adapters", "module_names", "with_dropout_key"]

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
QUANTIZE = ("none", "int8", "int4")

# Target -> the attribute names of the Linear layers that play that part, over every decoder port (one table:
# each architecture has only some of these names). A fused projection appears under each of its parts and is
# adapted as a whole (one A and B over the fused output) when any of its parts is targeted, as PEFT does:
#   llama, mistral, qwen2, gemma: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
#   opt:  q_proj, k_proj, v_proj, out_proj, fc1 (up), fc2 (down); no gate
#   gpt2: c_attn (q, k, v fused), attn_c_proj (o), c_fc (up), mlp_c_proj (down); no gate
#   phi3: qkv_proj (q, k, v fused), o_proj, gate_up_proj (gate, up fused), down_proj
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "c_attn", "qkv_proj"),
    "k": ("k_proj", "c_attn", "qkv_proj"),
    "v": ("v_proj", "c_attn", "qkv_proj"),
    "o": ("o_proj", "out_proj", "attn_c_proj"),
    "gate": ("gate_proj", "gate_up_proj"),
    "up": ("up_proj", "fc1", "c_fc", "gate_up_proj"),
    "down": ("down_proj", "fc2", "mlp_c_proj"),
}
# The methods callers run a causal LM through (PPO's value head reads hidden_states + logits_from_hidden); each one
# a class has is intercepted, so that an adapter applies whichever entry point is used.
INTERCEPTED_METHODS = ("__call__", "hidden_states", "logits_from_hidden")
# Attributes qwix sets on every module of the model it adapts; a merged model drops them.
_QWIX_MODULE_ATTRIBUTES = ("qwix_path", "qwix_rngs", "disable_quant_stats_update")
_LORA_A, _LORA_B = "weight_lora_a", "weight_lora_b"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA / QLoRA settings (each named as the command line spells it in errors).

    Attributes:
        rank: the adapters' rank R >= 1 (``--lora-rank``).
        alpha: the update is scaled by ``alpha / rank`` (``--lora-alpha``, > 0).
        targets: which projections get adapters, from :data:`TARGETS` (``--lora-targets``); see
            :data:`TARGET_MODULES` for the layers each names per architecture.
        dropout: dropout rate on the adapters' input while training, in [0, 1) (``--lora-dropout``).
        quantize_base: ``"none"``, or ``"int8"`` / ``"int4"`` to store the adapted layers' frozen base weights
            quantized (QLoRA; ``--quantize-base``).
    """

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0
    quantize_base: str = "none"

    def validate(self) -> None:
        """Raise a :class:`FinetuneError` naming the option of the first bad field."""
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise FinetuneError(f"--lora-rank must be an integer >= 1, got {rank!r}")
        if not _is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise FinetuneError(f"--lora-alpha must be a finite number > 0, got {self.alpha!r}")
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets:
            raise FinetuneError(f"--lora-targets must be a non-empty list of {', '.join(TARGETS)}, got {targets!r}")
        unknown = [target for target in targets if target not in TARGETS]
        if unknown:
            raise FinetuneError(f"--lora-targets has unknown target(s) {unknown}; choose from {', '.join(TARGETS)}")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise FinetuneError(f"--lora-dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.quantize_base not in QUANTIZE:
            raise FinetuneError(f"--quantize-base must be one of {', '.join(QUANTIZE)}, got {self.quantize_base!r}")


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _iter_modules(model: nnx.Module):
    return nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()


def _check_targets(targets: Any) -> None:
    LoraConfig(rank=1, targets=tuple(targets) if isinstance(targets, list) else targets).validate()


def module_names(model: nnx.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
    """The attribute names of ``model``'s Linear layers that ``targets`` adapt (per :data:`TARGET_MODULES`), in
    table order without repeats. A target the architecture lacks (``gate`` on OPT or GPT-2) is skipped; a
    :class:`FinetuneError` when no target matches a layer of ``model``."""
    _check_targets(targets)
    present = {path[-1] for path, module in _iter_modules(model) if path and isinstance(module, Linear)}
    names: list[str] = []
    for target in targets:
        for name in TARGET_MODULES[target]:
            if name in present and name not in names:
                names.append(name)
    if not names:
        raise FinetuneError(f"--lora-targets {list(targets)} match no layer of {type(model).__name__} (its linear "
                            f"layers: {sorted(present)})")
    return names


def _adapted_paths(model: nnx.Module, names: list[str]) -> list[tuple]:
    return [path for path, module in _iter_modules(model)
            if path and isinstance(module, Linear) and path[-1] in names]


def _lora_rule(config: LoraConfig, paths: list[tuple]):
    import qwix

    # qwix matches a rule's module_path (a regex, fullmatch) against "/".join of the module's path.
    module_path = "|".join(re.escape("/".join(map(str, path))) for path in paths)
    qtype = None if config.quantize_base == "none" else config.quantize_base
    return qwix.LoraRule(module_path=module_path, rank=int(config.rank), alpha=float(config.alpha),
                         dropout=float(config.dropout), weight_qtype=qtype)


def _is_adapted(model: Any) -> bool:
    return hasattr(type(model), "_lora_rule")


def _check_adapted(model: Any, function: str) -> None:
    if not _is_adapted(model):
        raise FinetuneError(f"{function} needs a model from add_adapters; {type(model).__name__} has no adapters")


def _intercepted_class(template: nnx.Module, base_class: type, rule: Any) -> type:
    """A subclass of ``base_class`` whose :data:`INTERCEPTED_METHODS` run under one qwix LoRA provider.

    qwix's public ``quantize_model`` intercepts a single method of an NNX model; with ``skip_nnx_init`` it only
    builds the intercepting class (on a cheap clone), so it is asked once per method and the intercepted methods
    are gathered into one class. They share one provider: a method called from another one (``__call__`` ->
    ``hidden_states``) finds the interception already active and does not apply the adapters twice.
    """
    import qwix

    provider = qwix.LoraProvider([rule])
    fields: dict[str, Any] = {"_unquantized_type": base_class, "_lora_rule": rule,
                              "__module__": base_class.__module__, "__qualname__": base_class.__qualname__}
    for method in INTERCEPTED_METHODS:
        if callable(getattr(base_class, method, None)):
            probe = qwix.quantize_model(template, provider, methods=(method,), skip_nnx_init=True)
            fields[method] = type(probe).__dict__[method]
    return type(base_class.__name__, (base_class,), fields)


def _shallow_copy(model: nnx.Module) -> nnx.Module:
    """A new module graph over the same arrays (nothing is copied on device)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state)


def add_adapters(model: nnx.Module, config: LoraConfig, *, seed: int = 0) -> nnx.Module:
    """A copy of ``model`` with LoRA adapters on the ``config.targets`` projections (QLoRA when
    ``config.quantize_base`` is int8/int4); ``model`` itself is left unchanged and usable.

    The copy shares the unquantized base arrays with ``model``; its adapters are ``nnx.LoRAParam`` ``weight_lora_a``
    ``[in, rank]`` (He-uniform from ``seed``) and ``weight_lora_b`` ``[rank, out]`` (zeros) on each adapted
    Linear. ``__call__``, ``hidden_states`` and ``logits_from_hidden`` (those the class has) apply them. Their
    ``logical_axes`` are ``(in_axis, None)`` and ``(None, out_axis)`` of the weight's names, so
    ``mapjax.sharding`` lays them out like the weight they adapt.
    """
    import qwix

    config.validate()
    if _is_adapted(model):
        raise FinetuneError(f"{type(model).__name__} already has LoRA adapters; merge_adapters() it first")
    if not isinstance(model, nnx.Module):
        raise FinetuneError(f"add_adapters needs a mapjax (flax nnx) model, got {type(model).__name__}")
    paths = _adapted_paths(model, module_names(model, config.targets))
    rule = _lora_rule(config, paths)
    # apply_lora_to_model works on a clone (the caller's module graph is untouched) and runs one forward to
    # create the adapters and, under QLoRA, replace each adapted base weight by its quantized form.
    sample_ids = jnp.zeros((1, 2), jnp.int32)
    adapted = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]), sample_ids, rngs=nnx.Rngs(seed))
    missing = [path for path in paths if not hasattr(_module_at(adapted, path), _LORA_A)]
    if missing:
        raise FinetuneError(f"qwix created no adapters on {['/'.join(map(str, path)) for path in missing]} of "
                            f"{type(model).__name__}: their forward does not run through Linear's einsum")
    adapted.__class__ = _intercepted_class(adapted, type(model), rule)
    _name_adapter_axes(adapted)
    return adapted


def _module_at(model: nnx.Module, path: tuple) -> Any:
    module = model
    for key in path:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def _adapted_linears(model: nnx.Module) -> list[tuple[tuple, Linear]]:
    return [(path, module) for path, module in _iter_modules(model)
            if isinstance(module, Linear) and hasattr(module, _LORA_A)]


def _name_adapter_axes(model: nnx.Module) -> None:
    """Give adapters and quantized weights logical axes of their own shapes.

    qwix copies the weight's Variable metadata onto what it creates but transposes only the keys it knows
    (``sharding_names``/``out_sharding``), so ``logical_axes`` arrive as the weight's ``(out, in)`` on
    ``A [in, r]``, ``B [r, out]`` and the ``[out, 1]`` scale. Rename them from the weight's names.
    """
    for _, linear in _adapted_linears(model):
        weight_axes = _weight_axes(linear)
        if weight_axes is None:
            continue
        out_axis, in_axis = weight_axes
        _set_axes(getattr(linear, _LORA_A), (in_axis, None))
        _set_axes(getattr(linear, _LORA_B), (None, out_axis))
        if not isinstance(linear.weight, nnx.Variable):   # quantized: qvalue [out, in] keeps both names
            scale = linear.weight.array.scale
            shape = tuple(scale.get_value().shape)
            _set_axes(scale, tuple(name if size > 1 else None for name, size in zip(weight_axes, shape)))


def _weight_axes(linear: Linear) -> tuple | None:
    weight = linear.weight
    variable = weight if isinstance(weight, nnx.Variable) else weight.array.qvalue
    axes = variable.get_metadata().get(LOGICAL_AXES) if isinstance(variable, nnx.Variable) else None
    return tuple(axes) if axes is not None and len(axes) == 2 else None


def _set_axes(variable: Any, axes: tuple) -> None:
    if isinstance(variable, nnx.Variable):
        variable.set_metadata(**{LOGICAL_AXES: axes})


def adapter_parameter_count(model: nnx.Module) -> int:
    """The number of trainable adapter values: ``rank * (in + out)`` summed over the adapted layers."""
    _check_adapted(model, "adapter_parameter_count")
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))


def _dense_weight(linear: Linear) -> jax.Array:
    """The adapted layer's base weight ``[out, in]`` as floats (dequantized under QLoRA)."""
    import qwix

    weight = linear.weight
    if isinstance(weight, nnx.Variable):
        return weight.get_value()
    quantized = jax.tree.map(lambda leaf: leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf,
                             weight.array, is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))
    return qwix.dequantize(quantized)


def _adapter_delta(linear: Linear, rule: Any) -> jax.Array:
    """``alpha / rank * (A B)^T`` in the weight's ``[out, in]`` layout, float32."""
    lora_a = getattr(linear, _LORA_A).get_value().astype(jnp.float32)
    lora_b = getattr(linear, _LORA_B).get_value().astype(jnp.float32)
    return (rule.alpha / rule.rank) * (lora_a @ lora_b).T


def merge_adapters(model: nnx.Module) -> nnx.Module:
    """A plain model of the original class (no interception, no adapters) whose adapted weights are
    ``dequant(W) + alpha / rank * (A B)^T``, in the weight's dtype; ``model`` is left as it was.

    It loads, samples and exports (``export_pretrained``) like any mapjax model; after QLoRA its weights are the
    dequantized base plus the update (full precision again).
    """
    _check_adapted(model, "merge_adapters")
    rule = type(model)._lora_rule
    merged = _shallow_copy(model)
    for _, linear in _adapted_linears(merged):
        base = _dense_weight(linear)
        axes = _weight_axes(linear)
        value = (base.astype(jnp.float32) + _adapter_delta(linear, rule)).astype(base.dtype)
        linear.weight = nnx.Param(value) if axes is None else nnx.Param(value, **{LOGICAL_AXES: axes})
        for name in (_LORA_A, _LORA_B, "weight_lora_einsum_str"):
            if hasattr(linear, name):
                delattr(linear, name)
    for _, module in _iter_modules(merged):
        for name in _QWIX_MODULE_ATTRIBUTES:
            if name in vars(module):
                delattr(module, name)
    _set_class(merged, type(model)._unquantized_type)
    return merged


def _set_class(module: nnx.Module, cls: type) -> None:
    """Give ``module`` class ``cls`` without nnx recording ``__class__`` as an attribute of its graph (as a plain
    ``module.__class__ = cls`` does), so a merged model's ``nnx.graphdef`` equals a freshly built one's."""
    object.__setattr__(module, "__class__", cls)
    nodes = vars(module).get("_pytree__nodes")
    if nodes is not None and "__class__" in nodes:
        object.__setattr__(module, "_pytree__nodes", type(nodes)({key: value for key, value in nodes.items()
                                                                   if key != "__class__"}))


def dropout_free(model: nnx.Module) -> nnx.Module:
    """``model`` with adapter dropout off, for sampling, scoring and reference passes (``model`` itself when its
    dropout is 0). The result shares ``model``'s arrays and has the same state structure, so the states of a
    training step merge into ``nnx.graphdef(dropout_free(model))`` as well."""
    _check_adapted(model, "dropout_free")
    rule = type(model)._lora_rule
    if rule.dropout == 0:
        return model
    free = _shallow_copy(model)
    base_class = type(model)._unquantized_type
    free.__class__ = _intercepted_class(free, base_class, dataclasses.replace(rule, dropout=0.0))
    return free


def with_dropout_key(model: nnx.Module, key: jax.Array) -> nnx.Module:
    """A copy of an adapted ``model`` (same arrays) whose adapter dropout masks are drawn from ``key``.

    qwix draws each mask from ``module.qwix_rngs["dropout"]`` of the module being run, which it leaves unset after
    ``add_adapters`` (a dropout model called without a key raises qwix's "Cannot find rngs"). This sets one
    ``nnx.Rngs(dropout=key)`` on every module: the masks are then a function of ``key`` (and of the order of the
    calls within one forward), so a training step is deterministic given the key it is passed, e.g.
    ``jax.random.fold_in(jax.random.key(seed), step)``. Call it inside the jitted step, on the model merged from
    its states; the caller's model is not changed, so its ``nnx.split`` structure stays the same.
    """
    _check_adapted(model, "with_dropout_key")
    keyed = _shallow_copy(model)
    keyed.set_attributes(qwix_rngs=nnx.Rngs(dropout=key))
    return keyed


def _hf_linear_names(model: nnx.Module) -> dict[int, tuple[str, str]]:
    """``id(weight object) -> (hf module name, layout)`` from the model's ``hf_parameters()``."""
    if not hasattr(model, "hf_parameters"):
        raise FinetuneError(f"{type(model).__name__} has no hf_parameters(); its adapters cannot be named for PEFT")
    names: dict[int, tuple[str, str]] = {}
    for hf_name, parameter, layout in model.hf_parameters():
        if hf_name.endswith(".weight"):
            names[id(parameter)] = (hf_name[: -len(".weight")], layout)
    return names


def export_peft(model: nnx.Module, directory: str | Path, config: LoraConfig, *,
                base_model_name_or_path: str | None = None) -> Path:
    """Write ``model``'s adapters in Hugging Face PEFT's LoRA format and return ``directory``.

    ``adapter_config.json`` (``target_modules`` lists the full names of the adapted modules, e.g.
    ``model.layers.0.self_attn.q_proj``; GPT-2's ``Conv1D`` layers set ``fan_in_fan_out``) and
    ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
    ``...lora_B.weight`` ``[out, r]`` in float32. ``peft.PeftModel.from_pretrained(base, directory)`` over the base
    model ``export_pretrained`` wrote then computes what ``model`` computes (up to quantization under QLoRA:
    PEFT's base is the unquantized one).
    """
    from safetensors.numpy import save_file

    _check_adapted(model, "export_peft")
    config.validate()
    rule = type(model)._lora_rule
    if (int(config.rank), float(config.alpha)) != (rule.rank, rule.alpha):
        raise FinetuneError(f"export_peft config has --lora-rank {config.rank} and --lora-alpha {config.alpha}, but "
                            f"the model was adapted with rank {rule.rank} and alpha {rule.alpha}")
    hf_names = _hf_linear_names(model)
    tensors: dict[str, np.ndarray] = {}
    target_modules: list[str] = []
    layouts: set[str] = set()
    for path, linear in _adapted_linears(model):
        if id(linear.weight) not in hf_names:
            raise FinetuneError(f"the adapted layer {'/'.join(map(str, path))} has no name in "
                                f"{type(model).__name__}.hf_parameters()")
        hf_module, layout = hf_names[id(linear.weight)]
        layouts.add(layout)
        target_modules.append(hf_module)
        lora_a = np.asarray(jax.device_get(getattr(linear, _LORA_A).get_value()), np.float32)
        lora_b = np.asarray(jax.device_get(getattr(linear, _LORA_B).get_value()), np.float32)
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = np.ascontiguousarray(lora_a.T)
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = np.ascontiguousarray(lora_b.T)
    if len(layouts) > 1:
        raise FinetuneError(f"{type(model).__name__} mixes Linear and Conv1D layers among the adapted ones; PEFT's "
                            "fan_in_fan_out is one setting per adapter")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(config.rank),
        "lora_alpha": float(config.alpha),
        "lora_dropout": float(config.dropout),
        "target_modules": target_modules,
        "fan_in_fan_out": layouts == {"transpose"},   # GPT-2's Conv1D stores [in, out]
        "bias": "none",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory
