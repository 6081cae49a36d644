"""Patch a PyTorch model with the quantized layers of a GPTQ / EXL2 / AWQ checkpoint directory."""

from __future__ import annotations

import warnings

from cupyq.arrays import requested_device
from cupyq.checkpoint import Checkpoint, open_checkpoint

__all__ = ["patch_model"]


def _resolved_device(device):
    """patch_model's ``device=`` as a QMatrix device argument, checked before anything else is touched: None
    (not given), ``"cpu"`` or a usable CUDA device index (:func:`cupyq.arrays.requested_device`)."""
    if device is None:
        return None
    index = requested_device(device)
    return "cpu" if index is None else index


def _qmatrix_device(device, weight):
    """The QMatrix ``device`` argument for a layer: ``device`` (resolved by :func:`_resolved_device`) or, when
    it is None, the device of the layer's weight (``"cpu"`` or a CUDA index)."""
    if device is not None:
        return device
    if weight.device.type == "cpu":
        return "cpu"
    if weight.device.type == "cuda":
        return weight.device.index
    raise ValueError(f"device: expected a CPU or CUDA device, got {weight.device} (pass device= for models on the "
                     f"meta device)")


def _parent_and_attr(model, name):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _padded_width(info, linear):
    """True when an EXL2 layer's stored width is the module's out_features padded (by fewer than 32 columns)."""
    return info.format == "exl2" and linear.out_features < info.out_features < linear.out_features + 32


def _materialise_device(device, path):
    """The torch device that tensors of a meta-device model are created on (``device`` as :func:`_resolved_device`
    gives it)."""
    import torch

    if device is None:
        raise ValueError(
            f"{path}: the model has parameters on the meta device; pass device= (e.g. 'cuda' or 'cpu') to say "
            "where patch_model creates them"
        )
    return torch.device("cpu") if device == "cpu" else torch.device("cuda", device)


def _initialised_buffers(model, module, names, device):
    """``{buffer name: value}`` of the float ``names`` of ``module`` as the model's ``_init_weights`` sets them.

    transformers models initialise the non-persistent buffers of modules that have no ``config`` to build them
    again from (Gemma's embedding ``embed_scale``) in ``_init_weights(module)``. It runs on a stand-in for the
    module: its parameters and other buffers are fresh meta tensors (so nothing of the model is written), the
    ``names`` NaN-filled tensors on ``device``; a buffer it leaves with a NaN (not set) is left out.
    """
    import copy

    import torch

    init = getattr(model, "_init_weights", None)
    floats = [b for b in names if module._buffers[b].is_floating_point()]
    if init is None or not floats:
        return {}
    probe = copy.copy(module)
    probe._parameters = {k: None if p is None else torch.nn.Parameter(torch.empty_like(p, device="meta"))
                         for k, p in module._parameters.items()}
    probe._buffers = {k: None if b is None else torch.empty_like(b, device="meta") for k, b in module._buffers.items()}
    probe._modules = {}
    for b in floats:
        probe._buffers[b] = torch.full_like(module._buffers[b], float("nan"), device=device)
    try:
        with torch.no_grad():
            init(probe)
    except Exception:  # noqa: BLE001 - any failure means the buffers cannot be initialised this way
        return {}
    values = {b: probe._buffers[b] for b in floats}
    return {b: v for b, v in values.items() if v is not None and not v.is_meta and bool(torch.isfinite(v).all())}


def _recompute_buffers(model, skip, device):
    """Fresh values of the non-persistent buffers on the meta device (rotary ``inv_freq`` and the like).

    Such buffers are computed by their module's constructor, never stored; each owning module is built
    again on ``device`` from its ``config`` (the Hugging Face convention), and a buffer that gives none is
    set by the model's ``_init_weights`` (:func:`_initialised_buffers`). Modules inside ``skip`` (the
    replaced layers) are left out. Returns ({"module.buffer": tensor}, [names that cannot be rebuilt]).
    """
    import torch

    values, missing = {}, []
    for mname, module in model.named_modules():
        if any(mname == s or mname.startswith(s + ".") for s in skip):
            continue
        names = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None
                 and module._buffers[b].is_meta]
        if not names:
            continue
        fresh = None
        config = getattr(module, "config", None)
        if config is not None:
            try:
                with torch.device(device):
                    fresh = type(module)(config)
            except Exception:  # noqa: BLE001 - any failure means the module cannot be rebuilt this way
                fresh = None
        rebuilt = {b: None if fresh is None else fresh._buffers.get(b) for b in names}
        rebuilt = {b: v for b, v in rebuilt.items()
                   if v is not None and not v.is_meta and tuple(v.shape) == tuple(module._buffers[b].shape)}
        if len(rebuilt) < len(names):
            rebuilt.update(_initialised_buffers(model, module, [b for b in names if b not in rebuilt], device))
        for b in names:
            full = f"{mname}.{b}" if mname else b
            if b in rebuilt:
                values[full] = rebuilt[b].to(device)
            else:
                missing.append(full)
    return values, missing


def _meta_names(model):
    """Qualified names of the parameters and buffers (persistent or not) still on the meta device."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    return names + [n for n, b in model.named_buffers(remove_duplicate=False) if b is not None and b.is_meta]


def _set_tensor(model, name, value):
    """Put ``value`` in place of the parameter or buffer ``name`` (a Parameter keeps its requires_grad)."""
    import torch

    parent, attr = _parent_and_attr(model, name)
    old = parent._parameters.get(attr)
    if old is not None:
        parent._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        return old, parent._parameters[attr]
    old = parent._buffers[attr]
    parent._buffers[attr] = value
    return old, value


def _tensor_of(model, name):
    parent, attr = _parent_and_attr(model, name)
    return parent._parameters.get(attr, parent._buffers.get(attr))


def _whole_layer(qm, out_features):
    """The module of an unsharded quantized layer: a QuantizedLinear, or a TrimmedQuantizedLinear that drops the
    padding columns of an EXL2 layer stored wider than the model's ``out_features`` (see :func:`_padded_width`)."""
    from cupyq.torch_ops import QuantizedLinear, TrimmedQuantizedLinear

    return QuantizedLinear(qm) if qm.out_features == out_features else TrimmedQuantizedLinear(qm, out_features)


def _what_is_there(modules, name):
    """What the model (``modules``: its ``named_modules()``) has under a quantized layer's ``name`` that is no
    Linear: the module's type, or that there is none (with the module whose name ends in ``.name``, as in a
    checkpoint of the base model written without the ``model.`` prefix)."""
    if name in modules:
        return f"a {type(modules[name]).__name__}"
    longer = next((m for m in modules if m.endswith("." + name)), None)
    return "no such module" if longer is None else f"no such module; the model has {longer!r}"


def _refuse_patched(ckpt, modules):
    """ValueError when a quantized layer of ``ckpt`` is a cupyq QuantizedLinear of the model already (``modules``:
    its ``named_modules()``): the model was patched before."""
    from cupyq.torch_ops import QuantizedLinear

    patched = [n for n in ckpt.quantized_layers if isinstance(modules.get(n), QuantizedLinear)]
    if patched:
        shown = ", ".join(repr(n) for n in patched[:5]) + (" ..." if len(patched) > 5 else "")
        raise ValueError(
            f"{ckpt.path}: {len(patched)} quantized layer(s) are already cupyq QuantizedLinear modules (the model was "
            f"patched before): {shown}; patch a freshly built model"
        )


def _warn_dropped_biases(ckpt, dropped, stacklevel):
    """Warn about the model biases (``"name.bias"``) whose Linear has a bias that the checkpoint's layer lacks
    (``stacklevel`` as the caller would pass it to ``warnings.warn``)."""
    if dropped:
        shown = ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else "")
        warnings.warn(
            f"{ckpt.path}: {len(dropped)} model bias(es) dropped: their Linear has a bias but the checkpoint's quantized "
            f"layer has none, so the layer computes x @ W without it: {shown}",
            stacklevel=stacklevel + 1,
        )


def _warn_other_model_type(ckpt, model, stacklevel):
    """Warn when the checkpoint's ``config.json`` names another ``model_type`` than the model's ``config`` (a
    checkpoint of another family whose layer names and shapes happen to fit), as transformers does when loading."""
    stored = ckpt.config.get("model_type") if isinstance(ckpt.config, dict) else None
    built = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(stored, str) and isinstance(built, str) and stored and built and stored != built:
        warnings.warn(
            f"{ckpt.path}: config.json says model_type {stored!r}, but the model is {built!r}; layers whose names "
            f"and shapes fit are patched all the same, and may not compute what the model expects",
            stacklevel=stacklevel + 1,
        )


def _refuse_differing_tied(ckpt, to_load, values):
    """ValueError when checkpoint tensors that load into one model tensor (tied parameters, e.g. ``lm_head.weight``
    and the embedding under ``tie_word_embeddings``) hold different values: the model cannot hold both, and which
    one it kept would depend on the order of the checkpoint's tensors. ``to_load``: [(tensor name, model tensor)];
    ``values``: {tensor name: NumPy array read from the checkpoint}."""
    import numpy as np

    names = {}
    for tname, target in to_load:
        names.setdefault(id(target), []).append(tname)
    for tied in (t for t in names.values() if len(t) > 1):
        for other in tied[1:]:
            if not np.array_equal(values[tied[0]], values[other]):
                raise ValueError(
                    f"{ckpt.path}: tensors '{tied[0]}' and '{other}' differ, but the model ties them (one shared "
                    f"parameter, e.g. tie_word_embeddings=True); build the model untied or store one of them"
                )


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
            ``"cuda:1"``, an int, a ``torch.device`` (every spelling of :func:`cupyq.arrays.requested_device`);
            None uses the device of each replaced layer's weight.

    A model built on the meta device (``with torch.device("meta"): model = ...``, so the full-precision
    weights are never allocated) is materialised on ``device``: checkpoint tensors become new parameters
    (tied parameters stay tied), non-persistent buffers such as rotary ``inv_freq`` are recomputed by
    building their module again from its ``config``, or else by the model's ``_init_weights`` (Gemma's
    embedding ``embed_scale``); ``device`` is then required.

    An EXL2 layer whose stored width is the module's ``out_features`` padded (converters pad N to a
    multiple of 32, e.g. a 32001-row ``lm_head`` stored as 32032) is accepted
    (:class:`cupyq.torch_ops.TrimmedQuantizedLinear`); the padding columns are dropped from its output.

    A quantized layer computes what its checkpoint holds: ``x @ W``, plus the checkpoint's bias when it has
    one. A Linear bias of the model that the checkpoint's layer lacks is dropped, with a warning naming it.

    The quantized weights are held by the modules' QMatrix objects, not by parameters or buffers:
    ``model.state_dict()`` (and so ``save_pretrained``) leaves them out, and warns once per process that
    it does. ``torch.save(model)`` pickles a model on the CPU; keep the checkpoint (or write one with
    :mod:`cupyq.checkpoint`) to save a model on a GPU.

    Returns the model. Raises ValueError (nothing is modified) when the checkpoint has no quantized
    layer at all, when a quantized layer has no ``nn.Linear`` of that name (or is a QuantizedLinear
    already: the model was patched before), its features differ, a loaded tensor's shape differs from
    the model's, a parameter or buffer would stay on the meta device (naming it), or two checkpoint
    tensors that differ load into one tied parameter; CheckpointError (nothing is modified: every
    matrix is built, and every other tensor read, before the first module is replaced) when a tensor
    is bad or cannot be read; SetupError or ValueError for a ``device`` that cannot be used, before
    anything is read. Warns about checkpoint tensors the model has no place for, about parameters the
    checkpoint leaves untouched, about dropped biases and about a checkpoint whose ``config.json``
    names another ``model_type`` than the model's ``config``.
    """
    device = _resolved_device(device)
    from cupyq.device import require_torch

    torch = require_torch("cupyq.patch_model")

    ckpt = checkpoint_dir if isinstance(checkpoint_dir, Checkpoint) else open_checkpoint(checkpoint_dir)
    modules = dict(model.named_modules())
    quantized = ckpt.quantized_layers
    _warn_other_model_type(ckpt, model, stacklevel=2)

    # Check everything, and build every matrix, before touching the model, so a bad checkpoint leaves it as it was.
    if not quantized:
        raise ValueError(
            f"{ckpt.path}: the checkpoint has no GPTQ, EXL2 or AWQ layer ({len(ckpt.tensors)} plain tensor(s)), so "
            "patch_model would replace nothing; pass a quantized checkpoint (a model's full-precision weights are "
            "loaded by load_state_dict or from_pretrained)"
        )
    _refuse_patched(ckpt, modules)
    not_linear = [n for n in quantized if not isinstance(modules.get(n), torch.nn.Linear)]
    if not_linear:
        found = [f"{n!r} ({_what_is_there(modules, n)})" for n in not_linear]
        shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
        raise ValueError(
            f"{ckpt.path}: {len(not_linear)} quantized layer(s) match no torch.nn.Linear of the model (only "
            f"torch.nn.Linear modules are replaced): {shown}"
        )
    for name in quantized:
        info, linear = ckpt.layers[name], modules[name]
        if info.in_features == linear.in_features and _padded_width(info, linear):
            continue
        if (info.in_features, info.out_features) != (linear.in_features, linear.out_features):
            swapped = (info.in_features, info.out_features) == (linear.out_features, linear.in_features)
            raise ValueError(
                f"{ckpt.path}: layer '{name}' is {info.format} with in_features={info.in_features}, "
                f"out_features={info.out_features}, but the model's Linear has in_features={linear.in_features}, "
                f"out_features={linear.out_features}"
                + (" (the features swapped: the layer was quantized from nn.Linear.weight [out, in] as it is, where "
                   "the quantizers take the weight [in, out], i.e. weight.T)" if swapped else "")
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

    meta_dev, buffers = None, {}
    if any(t.is_meta for _, t in to_load) or any(n not in replaced_params for n in _meta_names(model)):
        meta_dev = _materialise_device(device, ckpt.path)
        buffers, missing = _recompute_buffers(model, quantized, meta_dev)
        loading = {t for t, _ in to_load}
        # tied parameters share one tensor: loading any of its names materialises all of them
        loaded_ids = {id(state[t]) for t in loading}
        left = [
            n for n in _meta_names(model)
            if n not in replaced_params and n not in loading and n not in buffers and id(_tensor_of(model, n)) not in loaded_ids
        ]
        left += [m for m in missing if m not in left]
        if left:
            shown = ", ".join(left[:5]) + (" ..." if len(left) > 5 else "")
            raise ValueError(
                f"{ckpt.path}: {len(left)} model tensor(s) on the meta device are neither in the checkpoint nor "
                f"recomputable: {shown}"
            )

    # The dense modules stay referenced by `modules` until the end anyway, so holding every matrix at once
    # costs no more memory than replacing the modules one by one.
    layers = {}
    for name in quantized:
        layers[name] = _whole_layer(ckpt.qmatrix(name, device=devices[name]), modules[name].out_features)
    # Every other tensor is read before the first module is replaced too, so a failed read changes nothing.
    values = {tname: ckpt.load_tensor(tname) for tname, _ in to_load}
    _refuse_differing_tied(ckpt, to_load, values)
    # A Linear bias the checkpoint's layer lacks: its values are no part of the checkpoint (in a model built on the
    # meta device there are none), so the layer computes x @ W, as the checkpoint says, and the loss is said.
    dropped = [f"{name}.bias" for name, layer in layers.items()
               if modules[name].bias is not None and layer.qmatrix.bias is None]
    for name, layer in layers.items():
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer)
    loaded = set()
    with torch.no_grad():
        replaced = {}  # id(old meta tensor) -> its materialised replacement, to keep tied parameters tied
        for tname, target in to_load:
            value = torch.from_numpy(values.pop(tname))
            if target.is_meta:
                if id(target) not in replaced:
                    _, new = _set_tensor(model, tname, value.to(device=meta_dev, dtype=target.dtype))
                    replaced[id(target)] = new
            else:
                target.copy_(value.to(device=target.device, dtype=target.dtype))
            loaded.add(tname)
        for bname, value in buffers.items():
            _set_tensor(model, bname, value)
        if replaced:
            for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
                if p is not None and p.is_meta and id(p) in replaced:
                    parent, attr = _parent_and_attr(model, n)
                    store = parent._parameters if attr in parent._parameters else parent._buffers
                    store[attr] = replaced[id(p)]
    still = _meta_names(model)
    if still:  # cannot happen after the check above; a last guard against returning meta outputs
        raise ValueError(f"{ckpt.path}: tensors still on the meta device after loading: {', '.join(still[:5])}")

    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        warnings.warn(f"{ckpt.path}: {len(unused)} checkpoint tensor(s) not used by the model: {shown}", stacklevel=2)
    _warn_dropped_biases(ckpt, dropped, stacklevel=2)
    loaded_ids = {id(state[t]) for t in loaded}  # a tied name is loaded with the tensor it shares
    untouched = [k for k in state if k not in loaded and k not in replaced_params and id(state[k]) not in loaded_ids]
    if untouched:
        shown = ", ".join(untouched[:5]) + (" ..." if len(untouched) > 5 else "")
        warnings.warn(
            f"{ckpt.path}: {len(untouched)} model tensor(s) not in the checkpoint keep their values: {shown}",
            stacklevel=2,
        )
    return model
