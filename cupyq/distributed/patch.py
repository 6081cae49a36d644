"""Tensor-parallel patching of a Llama-style transformers model from a GPTQ / EXL2 / AWQ checkpoint."""

from __future__ import annotations

import os
import warnings

import numpy as np

from cupyq.checkpoint import Checkpoint, CheckpointError, open_checkpoint
from cupyq.distributed.shard import CheckpointLayer, shard_awq, shard_exl2, shard_gptq

__all__ = ["COLUMN_LAYERS", "ROW_LAYERS", "shard_qmatrix", "patch_model_tp"]

# Module names (last component) split by columns and by rows in a Llama-style decoder layer.
COLUMN_LAYERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_LAYERS = ("o_proj", "down_proj")


def _column_bias(t, mode):
    # A column shard adds its own bias slice; a row shard's bias is added once, after the reduce.
    return t.get("bias") if mode == "column" else None


def _gptq_shard(layer, rank, world_size, mode, device):
    from cupyq.qmatrix import QMatrix

    info = layer.info
    t = shard_gptq(layer, rank=rank, world_size=world_size, mode=mode)
    qm = QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], _column_bias(t, mode),
                           bits=info.bits[0], checkpoint_format=info.checkpoint_format,
                           v1_encoding=info.v1_encoding or "field", device=device)
    return qm, t


def _exl2_shard(layer, rank, world_size, mode, device):
    from cupyq.qmatrix import QMatrix

    t = shard_exl2(layer, rank=rank, world_size=world_size, mode=mode)
    k = layer.info.in_features // world_size if mode == "row" else None
    qm = QMatrix.from_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"],
                           _column_bias(t, mode), device=device, in_features=k)
    return qm, t


def _awq_shard(layer, rank, world_size, mode, device):
    from cupyq.qmatrix import QMatrix

    group_size = layer.info.group_size
    t = shard_awq(layer, rank=rank, world_size=world_size, mode=mode, group_size=group_size)
    if t["scales"].shape[0] == 1:  # one group (-1 or K): a row shard's group is its K/W rows
        group_size = -1
    qm = QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], _column_bias(t, mode), group_size=group_size,
                          device=device)
    return qm, t


_SHARDERS = {"gptq": _gptq_shard, "exl2": _exl2_shard, "awq": _awq_shard}


def shard_qmatrix(ckpt, name, *, rank, world_size, mode, device=None):
    """The rank's :class:`cupyq.QMatrix` of a checkpoint layer, reading only its slices where the layout allows.

    ckpt: an open :class:`cupyq.checkpoint.Checkpoint` or a checkpoint directory (opened for this call; open it
    once to shard many layers); name: a GPTQ, EXL2 or AWQ layer; mode ``"column"`` or ``"row"``; device as in
    ``QMatrix.from_gptq`` (None: CPU, the float32 reference path).
    Returns ``(qm, bias)``: column shards keep their bias slice inside ``qm`` and return ``bias=None``; row
    shards return ``qm`` without bias and the whole bias (float16 NumPy ``[N]`` or None), to be added once
    after the reduce. Raises ValueError naming the layer for a layer of any other format (e.g. a plain weight),
    TypeError naming ``ckpt`` when it is neither a Checkpoint nor a path.
    """
    ckpt = _opened(ckpt)
    info = ckpt.layer_info(name)
    shard = _SHARDERS.get(info.format)
    if shard is None:
        raise ValueError(
            f"{ckpt.path}: layer '{name}' has format {info.format!r}; only {', '.join(map(repr, _SHARDERS))} "
            "layers can be sharded"
        )
    qm, t = shard(CheckpointLayer(ckpt, name), rank, world_size, mode, device)
    return qm, (t.get("bias") if mode == "row" else None)


def _opened(ckpt) -> Checkpoint:
    """``ckpt`` if it is an open Checkpoint, else the checkpoint of directory ``ckpt``; TypeError naming ``ckpt``
    for anything but a Checkpoint, a str or a path."""
    if isinstance(ckpt, Checkpoint):
        return ckpt
    if not isinstance(ckpt, (str, os.PathLike)):
        raise TypeError(f"ckpt: expected a checkpoint directory (str or path) or an open cupyq.checkpoint.Checkpoint, "
                        f"got {type(ckpt).__name__}")
    return open_checkpoint(ckpt)


def _split_heads(attn, world_size):
    """Make an attention module's head counts local (older transformers read them from the module)."""
    for attr in ("num_heads", "num_key_value_heads", "hidden_size"):
        value = getattr(attn, attr, None)
        if isinstance(value, int):
            setattr(attn, attr, value // world_size)


def patch_model_tp(model, ckpt, group=None, *, device=None, column=COLUMN_LAYERS, row=ROW_LAYERS):
    """Shard a Llama-style model's quantized projections over a process group and load its other weights.

    model: a transformers Llama-style model (``model.layers.N.self_attn.{q,k,v,o}_proj``,
        ``model.layers.N.mlp.{gate,up,down}_proj``), modified in place, the same on every rank.
    ckpt: a checkpoint directory or an open :class:`cupyq.checkpoint.Checkpoint` (GPTQ, EXL2 or AWQ layers).
    group: the torch.distributed process group (None: the default one; torch.distributed not initialised
        means one rank).
    device: where the rank's matrices live (as in :func:`cupyq.patch_model`; None: each layer's weight device;
        with NCCL, normally ``f"cuda:{local_rank}"``).
    column, row: last module-name components to shard by columns / by rows (tuples of strings, no name in
        both).

    Column layers (q/k/v/gate/up) become :class:`ColumnParallelQuantLinear` with this rank's outputs (heads
    ``[r*H/W, (r+1)*H/W)`` of q and of k/v, a slice of the MLP width); row layers (o/down) become
    :class:`RowParallelQuantLinear` over the matching input slice, summed by one all-reduce. Other quantized
    layers (e.g. a quantized lm_head) are replicated as :class:`cupyq.torch_ops.QuantizedLinear` (an EXL2 one
    stored with padding columns as a :class:`cupyq.torch_ops.TrimmedQuantizedLinear`, as patch_model does); other
    checkpoint tensors (embeddings, norms, fp16 lm_head) are loaded whole. ``num_attention_heads`` and
    ``num_key_value_heads`` of ``model.config`` must be multiples of the world size; the transformers
    attention reads its local head count from the projections' widths (``model.config`` keeps the global
    counts: a cache sized from the config, e.g. a static cache, must be built for the local heads).
    A Linear bias that the checkpoint's layer lacks is dropped with a warning naming it, as
    :func:`cupyq.patch_model` does. Returns the model.

    Raises TypeError naming ``model``, ``ckpt``, ``column`` or ``row`` for an argument of the wrong type, and
    ValueError when the model was patched before, when tensors the checkpoint would be copied into are on the
    meta device (unlike :func:`cupyq.patch_model`, build the model on the CPU or a GPU), or as below.

    Nothing is modified until every rank has built all of its layers: each rank checks the model against the
    checkpoint and builds its shards (checking only its own slices of the tensors), then one all-reduce over
    ``group`` (an int32 vector on the CPU for gloo, on the current CUDA device for NCCL; none with one rank)
    tells every rank which ranks failed. A rank that failed raises its own error (ValueError naming the layer
    when a layer does not fit or its shard is bad); the other ranks raise ValueError naming the failed ranks
    (RuntimeError when one of those failed otherwise). Either way the model is left unchanged on every rank.
    Every rank must call this function (it is a collective of ``group``).
    """
    from cupyq.distributed.layers import group_rank_and_size

    rank, world_size = group_rank_and_size(group)
    source = ckpt.path if isinstance(ckpt, Checkpoint) else ckpt
    try:
        built = _build_tp(model, ckpt, group, rank, world_size, device, column, row)
    except Exception as exc:
        _agree(group, rank, world_size, source, exc)
        raise
    _agree(group, rank, world_size, source, None)
    return _apply_tp(model, built, world_size)


def _build_tp(model, ckpt, group, rank, world_size, device, column, row):
    """Check the model against the checkpoint and build this rank's layers; modifies nothing."""
    import torch

    from cupyq.model import _meta_names, _padded_width, _qmatrix_device, _refuse_patched, _resolved_device, _whole_layer

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers Llama-style model), got {type(model).__name__}")
    column, row = _layer_names("column", column), _layer_names("row", row)
    both = sorted(set(column) & set(row))
    if both:
        raise ValueError(f"column, row: a layer is split by columns or by rows, not both; {both} are in both")
    device = _resolved_device(device)
    ckpt = _opened(ckpt)
    modules = dict(model.named_modules())
    _refuse_patched(ckpt, modules)
    config = getattr(model, "config", None)
    for attr in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, attr, None)
        if isinstance(heads, int) and heads % world_size:
            raise ValueError(f"model.config.{attr} = {heads} is not a multiple of the world size {world_size}")

    def mode_of(name):
        last = name.rsplit(".", 1)[-1]
        return "column" if last in column else "row" if last in row else None

    plan = {}
    for name in ckpt.quantized_layers:
        info, linear = ckpt.layers[name], modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"{ckpt.path}: quantized layer '{name}' matches no torch.nn.Linear of the model")
        replicated_padding = mode_of(name) is None and info.in_features == linear.in_features and _padded_width(
            info, linear)  # e.g. an EXL2 lm_head stored 32 columns wide, as patch_model accepts it
        if not replicated_padding and (info.in_features, info.out_features) != (linear.in_features, linear.out_features):
            raise ValueError(
                f"{ckpt.path}: layer '{name}' is {info.format} {info.in_features}x{info.out_features}, the model's "
                f"Linear {linear.in_features}x{linear.out_features}"
            )
        plan[name] = mode_of(name)
    dense = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and mode_of(n) and n not in plan]
    if dense:
        raise ValueError(f"{ckpt.path}: projections without quantized tensors cannot be sharded: {dense[:5]}")
    devices = {name: _qmatrix_device(device, modules[name].weight) for name in plan}
    replaced = {f"{n}.{p}" for n in plan for p, _ in modules[n].named_parameters(recurse=False)}
    on_meta = [n for n in _meta_names(model) if n not in replaced]
    if on_meta:
        raise ValueError(
            f"{ckpt.path}: {len(on_meta)} model tensor(s) are on the meta device: {', '.join(on_meta[:5])}; "
            "patch_model_tp copies the checkpoint into the model's tensors, so build the model on the CPU or a GPU"
        )
    state = model.state_dict(keep_vars=True)
    to_load = []
    for tname in ckpt.extra_tensor_names():
        target = state.get(tname)
        if target is None or tname in replaced:
            continue
        shape = tuple(ckpt.tensors[tname].shape)
        if shape != tuple(target.shape):
            raise ValueError(f"{ckpt.tensors[tname].file}: tensor '{tname}' has shape {list(shape)}, the model's {list(target.shape)}")
        to_load.append((tname, target))

    layers, dropped = {}, []
    for name, mode in plan.items():
        if mode is None:
            layers[name] = _whole_layer(ckpt.qmatrix(name, device=devices[name]), modules[name].out_features)
            has_bias = layers[name].qmatrix.bias is not None
        else:
            try:
                layers[name], has_bias = _parallel_layer(ckpt, name, modules[name].weight, rank, world_size, mode,
                                                         devices[name], group)
            except ValueError as exc:
                if isinstance(exc, CheckpointError):  # names the file and tensor already
                    raise
                where = f"{ckpt.path}: layer '{name}' ({mode} shard of rank {rank} of {world_size})"
                raise ValueError(f"{where}: {exc}") from None
        if modules[name].bias is not None and not has_bias:
            dropped.append(f"{name}.bias")
    return dict(ckpt=ckpt, plan=plan, layers=layers, to_load=to_load, replaced=replaced, state=state, dropped=dropped)


def _parallel_layer(ckpt, name, weight, rank, world_size, mode, device, group):
    """``(module, has_bias)``: the rank's ColumnParallelQuantLinear or RowParallelQuantLinear of a checkpoint layer
    (a row layer's bias in the dtype and on the device of the model's ``weight``)."""
    import torch

    from cupyq.distributed.layers import ColumnParallelQuantLinear, RowParallelQuantLinear

    qm, bias = shard_qmatrix(ckpt, name, rank=rank, world_size=world_size, mode=mode, device=device)
    if mode == "column":
        return ColumnParallelQuantLinear(qm, group=group), qm.bias is not None
    if bias is not None:
        bias = torch.from_numpy(np.asarray(bias)).to(weight.device, weight.dtype)
    return RowParallelQuantLinear(qm, bias, group=group), bias is not None


def _layer_names(argument, names):
    """``names`` (patch_model_tp's ``column`` or ``row``) as a tuple of strings; TypeError naming ``argument``
    for a single string (which would match by substring) or anything but a collection of strings."""
    if isinstance(names, (str, bytes)) or not isinstance(names, (tuple, list, set, frozenset)) or not all(
            isinstance(n, str) for n in names):
        raise TypeError(f"{argument}: expected a tuple of module names (last name components, e.g. ('q_proj', "
                        f"'k_proj')), got {type(names).__name__} {names!r}")
    return tuple(names)


def _collective_device(group):
    """The device of a tensor that ``group``'s backend reduces: the current CUDA device for NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(group, rank, world_size, source, error):
    """Tell every rank of ``group`` which ranks failed to build their layers: one all-reduce, none with one rank
    or without torch.distributed initialised.

    error: this rank's exception, or None when it built all its layers. Returns when no rank failed, or when
    this one did (the caller re-raises its own error); otherwise raises ValueError (RuntimeError when some
    failed rank's error was not a ValueError) naming the failed ranks.
    """
    import torch
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    # One slot per rank: 0 built, 1 a ValueError (the checkpoint does not fit), 2 any other error.
    codes = torch.zeros(world_size, dtype=torch.int32, device=_collective_device(group))
    codes[rank] = 0 if error is None else 1 if isinstance(error, ValueError) else 2
    dist.all_reduce(codes, group=group)
    codes = codes.cpu().tolist()
    failed = [r for r, code in enumerate(codes) if code]
    if error is not None or not failed:
        return
    kind = ValueError if all(codes[r] == 1 for r in failed) else RuntimeError
    if len(failed) == 1:
        who = f"rank {failed[0]} of {world_size} could not build its"
    else:
        who = f"ranks {', '.join(map(str, failed))} of {world_size} could not build their"
    raise kind(
        f"{source}: {who} tensor-parallel layers (see the error raised there); rank {rank} built its own, but "
        "the model was left unchanged on every rank"
    )


def _apply_tp(model, built, world_size):
    """Replace the modules and load the other tensors that :func:`_build_tp` prepared."""
    import torch

    from cupyq.model import _parent_and_attr, _warn_dropped_biases

    ckpt, plan, state, replaced, to_load = (built[k] for k in ("ckpt", "plan", "state", "replaced", "to_load"))
    attention = set()
    for name, layer in built["layers"].items():
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer)
        if attr in ("q_proj", "k_proj", "v_proj", "o_proj") and plan[name] is not None:
            attention.add(parent)
    for attn in attention:
        _split_heads(attn, world_size)
    with torch.no_grad():
        for tname, target in to_load:
            target.copy_(torch.from_numpy(ckpt.load_tensor(tname)).to(device=target.device, dtype=target.dtype))
    _warn_dropped_biases(ckpt, built["dropped"], stacklevel=3)
    loaded = {t for t, _ in to_load}
    untouched = [k for k in state if k not in loaded and k not in replaced]
    if untouched:
        warnings.warn(f"{ckpt.path}: {len(untouched)} model tensor(s) not in the checkpoint keep their values: "
                      f"{', '.join(untouched[:5])}", stacklevel=3)
    return model
