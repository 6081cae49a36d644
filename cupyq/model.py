"""Patch a PyTorch model with the quantized layers of a GPTQ / EXL2 / AWQ checkpoint directory."""

from __future__ import annotations

import warnings

from cupyq.checkpoint import Checkpoint, open_checkpoint

__all__ = ["patch_model"]


def _qmatrix_device(device, weight):
    """The QMatrix ``device`` argument for a layer: ``"cpu"`` or a CUDA device index."""
    import torch

    dev = weight.device if device is None else torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        return torch.cuda.current_device() if dev.index is None else dev.index
    raise ValueError(f"device: expected a CPU or CUDA device, got {dev} (pass device= for models on the meta device)")


def _parent_and_attr(model, name):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def patch_model(model, checkpoint_dir, *, device=None):
    """Replace the model's quantized linear layers and load its other weights from a checkpoint.

    Every ``torch.nn.Linear`` whose qualified name (``model.layers.0.self_attn.q_proj``) is a GPTQ,
    EXL2 or AWQ layer of the checkpoint becomes a :class:`cupyq.torch_ops.QuantizedLinear` holding a
    :class:`cupyq.QMatrix` of that layer. Every other checkpoint tensor whose name is in the model's
    ``state_dict()`` (embeddings, norms, an fp16 ``lm_head.weight``...) is copied into the existing
    parameter or buffer, cast to its dtype and device.

    Args:
        model: a ``torch.nn.Module`` (modified in place). Note the layouts: ``nn.Linear.weight`` is
            ``[out, in]`` while quantized tensors are ``[in, out]``; shapes are compared as features.
        checkpoint_dir: a checkpoint directory (or an open :class:`cupyq.checkpoint.Checkpoint`).
        device: where the quantized matrices live: ``"cpu"`` (the float32 reference path), ``"cuda"``,
            ``"cuda:1"``, a ``torch.device``; None uses the device of each replaced layer's weight.

    Returns the model. Raises ValueError (nothing is modified) when a quantized layer has no
    ``nn.Linear`` of that name, its features differ, or a loaded tensor's shape differs from the
    model's; warns about checkpoint tensors the model has no place for and about parameters the
    checkpoint leaves untouched.
    """
    import torch

    from cupyq.torch_ops import QuantizedLinear

    ckpt = checkpoint_dir if isinstance(checkpoint_dir, Checkpoint) else open_checkpoint(checkpoint_dir)
    modules = dict(model.named_modules())
    quantized = ckpt.quantized_layers

    # Check everything before touching the model, so a bad checkpoint leaves it as it was.
    not_linear = [n for n in quantized if not isinstance(modules.get(n), torch.nn.Linear)]
    if not_linear:
        shown = ", ".join(repr(n) for n in not_linear[:5]) + (" ..." if len(not_linear) > 5 else "")
        raise ValueError(f"{ckpt.path}: {len(not_linear)} quantized layer(s) match no torch.nn.Linear of the model: {shown}")
    for name in quantized:
        info, linear = ckpt.layers[name], modules[name]
        if (info.in_features, info.out_features) != (linear.in_features, linear.out_features):
            raise ValueError(
                f"{ckpt.path}: layer '{name}' is {info.format} with in_features={info.in_features}, "
                f"out_features={info.out_features}, but the model's Linear has in_features={linear.in_features}, "
                f"out_features={linear.out_features}"
            )
    devices = {name: _qmatrix_device(device, modules[name].weight) for name in quantized}

    replaced_params = {f"{n}.{p}" for n in quantized for p, _ in modules[n].named_parameters(recurse=False)}
    replaced_params |= {f"{n}.{b}" for n in quantized for b, _ in modules[n].named_buffers(recurse=False)}
    state = model.state_dict(keep_vars=True)
    to_load, unused = [], []
    for tname in ckpt.extra_tensor_names():
        target = state.get(tname)
        if target is None or tname in replaced_params:
            unused.append(tname)
            continue
        shape = tuple(ckpt.tensors[tname].shape)
        if shape != tuple(target.shape):
            raise ValueError(
                f"{ckpt.tensors[tname].file}: tensor '{tname}' has shape {list(shape)}, "
                f"but the model's {tname} has shape {list(target.shape)}"
            )
        to_load.append((tname, target))

    for name in quantized:
        qm = ckpt.qmatrix(name, device=devices[name])
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, QuantizedLinear(qm))
    loaded = set()
    with torch.no_grad():
        for tname, target in to_load:
            value = torch.from_numpy(ckpt.load_tensor(tname))
            target.copy_(value.to(device=target.device, dtype=target.dtype))
            loaded.add(tname)

    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        warnings.warn(f"{ckpt.path}: {len(unused)} checkpoint tensor(s) not used by the model: {shown}", stacklevel=2)
    untouched = [k for k in state if k not in loaded and k not in replaced_params]
    if untouched:
        shown = ", ".join(untouched[:5]) + (" ..." if len(untouched) > 5 else "")
        warnings.warn(
            f"{ckpt.path}: {len(untouched)} model tensor(s) not in the checkpoint keep their values: {shown}",
            stacklevel=2,
        )
    return model
