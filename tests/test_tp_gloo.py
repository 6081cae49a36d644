"""Tensor parallelism across processes: 2 and 4 CPU ranks on the gloo backend, float32 reference path.

Each test spawns its ranks (torch.multiprocessing, spawn start method, a free local port) and fails instead
of hanging when they do not finish within TIMEOUT seconds. The ranks check their results themselves; an
assertion in any rank fails the test with that rank's traceback.
"""

import datetime
import json
import re
import socket
import time
import warnings

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from cupyq import QMatrix, gemm  # noqa: E402
from cupyq.quantize import quantize_awq, quantize_exl2, quantize_gptq  # noqa: E402

TIMEOUT = 300  # seconds for all ranks of one test; collectives time out after COLLECTIVE_TIMEOUT
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
K, N, M = 256, 128, 5
LAYER_CASES = {  # name -> (format, settings)
    "gptq-4bit-g32": ("gptq", dict(bits=4, group_size=32, act_order=False, checkpoint_format="gptq")),
    "gptq-4bit-g32-act": ("gptq", dict(bits=4, group_size=32, act_order=True, checkpoint_format="gptq")),
    "gptq-3bit-g64-act-v2": ("gptq", dict(bits=3, group_size=64, act_order=True, checkpoint_format="gptq_v2")),
    "gptq-8bit-g48": ("gptq", dict(bits=8, group_size=48, act_order=False, checkpoint_format="gptq")),
    "gptq-2bit-g16-act": ("gptq", dict(bits=2, group_size=16, act_order=True, checkpoint_format="gptq")),
    "exl2-8-4": ("exl2", dict(bits=(8, 4), proportions=(0.25, 0.75))),
    "exl2-6-5-3": ("exl2", dict(bits=(6, 5, 3), proportions=(0.3, 0.3, 0.4))),
    "exl2-5-4-2": ("exl2", dict(bits=(5, 4, 2), proportions=(0.2, 0.5, 0.3))),
}


# ------------------------------------------------------------------------------------------------ spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, backend, collective_timeout, args):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=collective_timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "no GPU kernel ran": the CPU path is the point
            fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size, *args, timeout=TIMEOUT, backend="gloo", collective_timeout=COLLECTIVE_TIMEOUT):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned ranks (gloo; NCCL: rank r on cuda:r);
    fail on error or timeout."""
    ctx = mp.start_processes(_entry, args=(fn, world_size, _free_port(), backend, collective_timeout, args),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException on failure
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world_size} ranks of {fn.__name__} did not finish within {timeout} s")


def _relative(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------------------ layers
def _layer(case):
    """Checkpoint tensors of one case, the same in every rank (seeded)."""
    fmt, settings = LAYER_CASES[case]
    rng = np.random.default_rng(sorted(LAYER_CASES).index(case))
    w = rng.standard_normal((K, N)).astype(np.float32)
    bias = rng.standard_normal(N)
    if fmt == "gptq":
        return quantize_gptq(w, sym=False, importance=rng.random(K), bias=bias, **settings)
    return quantize_exl2(w, importance=rng.random(K), bias=bias, **settings)


def _qmatrix(t, fmt, bits=None, bias=True, in_features=None):
    b = t.get("bias") if bias else None
    if fmt == "gptq":
        return QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], b, bits=bits,
                                 checkpoint_format=t["checkpoint_format"])
    return QMatrix.from_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"], b,
                             in_features=in_features)


def _layers_worker(rank, world_size):
    from cupyq.distributed import ColumnParallelQuantLinear, RowParallelQuantLinear, shard_exl2, shard_gptq

    for case in LAYER_CASES:
        fmt, settings = LAYER_CASES[case]
        full = _layer(case)
        bits = settings.get("bits") if fmt == "gptq" else None
        extra = {"checkpoint_format": settings["checkpoint_format"]} if fmt == "gptq" else {}
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
        ref = gemm(x, _qmatrix({**full, **extra}, fmt, bits))  # the unsharded layer, bias included

        def shard(mode):
            if fmt == "gptq":
                return {**shard_gptq(full, rank=rank, world_size=world_size, mode=mode, bits=bits), **extra}
            return shard_exl2(full, rank=rank, world_size=world_size, mode=mode)

        col = shard("column")
        gathered = ColumnParallelQuantLinear(_qmatrix(col, fmt, bits), gather_output=True)(x)
        local = ColumnParallelQuantLinear(_qmatrix(col, fmt, bits))(x)
        part = N // world_size
        assert gathered.shape == (M, N) and local.shape == (M, part), case
        # Both sides are float32 products of the same weights; only summation order may differ.
        assert _relative(gathered, ref) < 1e-5, (case, "column", rank, _relative(gathered, ref))
        assert _relative(local, ref[:, rank * part : (rank + 1) * part]) < 1e-5, (case, "column-local", rank)

        row = shard("row")
        qm = _qmatrix(row, fmt, bits, bias=False, in_features=K // world_size)
        bias = torch.from_numpy(row["bias"].astype(np.float32))
        rows = slice(rank * K // world_size, (rank + 1) * K // world_size)
        y = RowParallelQuantLinear(qm, bias)(x[:, rows].contiguous())
        assert _relative(y, ref) < 1e-5, (case, "row", rank, _relative(y, ref))
        y_whole_input = RowParallelQuantLinear(qm, bias, input_is_parallel=False)(x)
        assert _relative(y_whole_input, ref) < 1e-5, (case, "row, whole input", rank)


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layers_match_the_unsharded_layer(world_size):
    """Column (gathered and local) and row (summed, bias once) outputs of every case equal the unsharded
    product: GPTQ 2/3/4/8-bit with and without act-order, groups of 16-64 rows (48 straddles the rank
    boundaries), EXL2 mixes of 2-8 bits."""
    run_ranks(_layers_worker, world_size)


# ------------------------------------------------------------------------------------------------ Llama
LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
EXL2_RECIPE = {
    "q_proj": ((8, 4), (0.25, 0.75)),
    "k_proj": ((6, 4), (0.5, 0.5)),
    "v_proj": ((6, 5, 4), (0.2, 0.3, 0.5)),
    "o_proj": ((5, 4, 3), (0.25, 0.5, 0.25)),
    "gate_proj": ((4, 3), (0.5, 0.5)),
    "up_proj": ((4, 3), (0.5, 0.5)),
    "down_proj": ((6, 4, 2), (0.25, 0.5, 0.25)),
}


LLAMA_BIASES = dict(LLAMA, attention_bias=True, mlp_bias=True)  # every projection has a bias
GPTQMODEL_V1 = Path(__file__).parent / "data" / "gptqmodel_asym_v1"  # v1 zero points written per word


def _llama(seed, settings=LLAMA):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**settings)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).eval()


def _write_llama(directory, kind, settings=LLAMA):
    from cupyq.checkpoint import save_awq, save_exl2, save_gptq

    source = _llama(0, settings)
    rng = np.random.default_rng(0)
    layers = {}
    for name, lin in source.named_modules():
        if not (isinstance(lin, torch.nn.Linear) and ".layers." in name):
            continue
        w = lin.weight.detach().numpy().T
        bias = None if lin.bias is None else lin.bias.detach().numpy()
        if kind == "gptq":
            layers[name] = quantize_gptq(w, bits=4, group_size=32, act_order=True, importance=rng.random(w.shape[0]),
                                         bias=bias)
        elif kind == "awq":
            layers[name] = quantize_awq(w, group_size=32, bias=bias)
        else:
            widths, props = EXL2_RECIPE[name.rsplit(".", 1)[1]]
            layers[name] = quantize_exl2(w, bits=widths, proportions=props, importance=rng.random(w.shape[0]),
                                         bias=bias)
    quantized = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    extras = {k: v.detach().numpy().astype(np.float16) for k, v in source.state_dict().items() if k not in quantized}
    if kind == "gptq":
        return save_gptq(directory, layers, bits=4, group_size=32, desc_act=True, sym=True, extra_tensors=extras)
    if kind == "awq":
        return save_awq(directory, layers, group_size=32, extra_tensors=extras)
    return save_exl2(directory, layers, extra_tensors=extras)


def _settings_of(directory):
    """The LlamaConfig settings of a checkpoint's config.json, without its quantization config."""
    config = json.loads((Path(directory) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in ("quantization_config", "architectures", "dtype")}


def _llama_worker(rank, world_size, cases, tolerance):
    from cupyq.distributed import ColumnParallelQuantLinear, RowParallelQuantLinear, patch_model_tp
    from cupyq.model import patch_model

    for directory, settings in cases:
        ids = torch.randint(0, settings["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
        whole = patch_model(_llama(1, settings), directory)
        sharded = patch_model_tp(_llama(2, settings), directory)
        attn = sharded.model.layers[0].self_attn
        head_dim = settings["hidden_size"] // settings["num_attention_heads"]
        assert isinstance(attn.q_proj, ColumnParallelQuantLinear) and isinstance(attn.o_proj, RowParallelQuantLinear)
        assert attn.q_proj.out_features == settings["hidden_size"] // world_size
        assert attn.k_proj.out_features == settings["num_key_value_heads"] * head_dim // world_size
        assert sharded.model.layers[-1].mlp.down_proj.in_features == settings["intermediate_size"] // world_size
        with torch.no_grad():
            ref = whole(ids).logits
            got = sharded(ids).logits
            greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
            ref_tokens, tokens = whole.generate(ids, **greedy), sharded.generate(ids, **greedy)
        # Same float32 weights; partial sums over ranks reorder the additions only.
        assert _relative(got, ref) < tolerance, (str(directory), rank, _relative(got, ref))
        assert torch.equal(tokens, ref_tokens), (str(directory), rank)


def test_tiny_llama_sharded_two_ways_gives_the_unsharded_logits(tmp_path):
    pytest.importorskip("transformers")
    cases = [(_write_llama(tmp_path / kind, kind), LLAMA) for kind in ("gptq", "exl2")]
    run_ranks(_llama_worker, 2, cases, 1e-5)


def test_awq_and_gptqmodel_llamas_sharded_two_ways_give_the_unsharded_logits(tmp_path):
    """AWQ column and row layers, every one with a bias (added once after the row reduce), and a GPTQModel
    checkpoint whose v1 zero points are decoded per word, as the unsharded model decodes them."""
    pytest.importorskip("transformers")
    cases = [(_write_llama(tmp_path / "awq", "awq", LLAMA_BIASES), LLAMA_BIASES),
             (GPTQMODEL_V1, _settings_of(GPTQMODEL_V1))]
    run_ranks(_llama_worker, 2, cases, 1e-6)


NARROW = dict(LLAMA, hidden_size=64, intermediate_size=128)  # head_dim 16: k_proj and v_proj have 32 outputs


def _write_narrow_gptq(directory, bits):
    """A GPTQ checkpoint (no act-order, groups of 32) of a seeded NARROW Llama, its other tensors float32."""
    import transformers

    from cupyq.checkpoint import save_gptq

    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(transformers.LlamaConfig(**NARROW)).eval()
    quantized = [n for n, m in source.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    extras = {k: v.detach().numpy() for k, v in source.state_dict().items()
              if k.rsplit(".", 1)[0] not in quantized}
    layers = {n: quantize_gptq(source.get_submodule(n).weight.detach().numpy().T, bits=bits, group_size=32)
              for n in quantized}
    return save_gptq(directory, layers, bits=bits, group_size=32, desc_act=False, sym=True, extra_tensors=extras)


def _spoil_scales(directory, layer, rows, cols):
    """Set ``scales[rows, cols]`` of one layer of a checkpoint written by :func:`_write_narrow_gptq` to NaN."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    file = str(Path(directory) / "model.safetensors")
    with safe_open(file, "np") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors[f"{layer}.scales"][rows, cols] = np.nan
    save_file(tensors, file, metadata=metadata)
    return directory


def _write_unfit_llamas(directory):
    """Two GPTQ checkpoints of a Llama whose layers mostly shard over 2 ranks, each with one layer that does not:
    ``narrow``: 3-bit, so k_proj's 32 outputs do not split into halves of whole 32-column units; ``nan``: 4-bit
    with NaN scales in the last projection of the last decoder layer."""
    bad = "model.layers.1.self_attn.v_proj"  # the last quantized layer in the checkpoint's order
    # One NaN in each rank's half: a rank checks only its own.
    return {"narrow": _write_narrow_gptq(directory / "narrow", 3),
            "nan": _spoil_scales(_write_narrow_gptq(directory / "nan", 4), bad, 1, [3, 16 + 3])}


def _model_snapshot(model):
    """A function asserting that ``model``'s modules, tensors and attention head counts are as they are now."""
    def numbers():  # the head counts and sizes of the attention modules
        return [{k: v for k, v in vars(m.self_attn).items() if isinstance(v, int)} for m in model.model.layers]

    modules = dict(model.named_modules())
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    heads = numbers()

    def check(what):
        now = dict(model.named_modules())
        assert now.keys() == modules.keys() and all(now[n] is modules[n] for n in modules), what
        assert all(torch.equal(v, tensors[k]) for k, v in model.state_dict().items()), what
        assert numbers() == heads, what

    return check


def _unfit_worker(rank, world_size, paths):
    import transformers

    from cupyq.checkpoint import open_checkpoint
    from cupyq.distributed import patch_model_tp

    assert open_checkpoint(paths["nan"]).quantized_layers[-1] == "model.layers.1.self_attn.v_proj"
    expected = {
        "narrow": r"layer 'model\.layers\.0\.self_attn\.k_proj' \(column shard of rank \d of 2\): qweight "
                  r"out_features: 32 does not split",
        "nan": r"layer 'model\.layers\.1\.self_attn\.v_proj' \(column shard of rank \d of 2\): scales: "
               r"expected finite values",
    }
    for kind, message in expected.items():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**NARROW)).eval()
        unchanged = _model_snapshot(model)
        with pytest.raises(ValueError, match=message):
            patch_model_tp(model, paths[kind])
        unchanged((kind, rank))


def test_patch_model_tp_checks_every_layer_before_modifying_the_model(tmp_path):
    """A layer that does not shard, early (k_proj of layer 0) or late (bad scales in the last layer): the error
    names it, and every module and tensor of the model is as it was."""
    pytest.importorskip("transformers")
    run_ranks(_unfit_worker, 2, _write_unfit_llamas(tmp_path))


def _write_one_rank_spoilt_llamas(directory):
    """``(checkpoint, layer, mode, rank)`` cases whose NaN scales lie only in the slice that ``rank`` of 2 owns:
    columns 64.. of up_proj (128 outputs) and group 0 (rows 0..31 of 128) of down_proj."""
    up, down = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"
    return [(_spoil_scales(_write_narrow_gptq(directory / "column", 4), up, 1, 64 + 5), up, "column", 1),
            (_spoil_scales(_write_narrow_gptq(directory / "row", 4), down, 0, 7), down, "row", 0)]


def _one_rank_fails_worker(rank, world_size, cases):
    import transformers

    from cupyq.distributed import patch_model_tp

    for directory, layer, mode, bad_rank in cases:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**NARROW)).eval()
        unchanged = _model_snapshot(model)
        if rank == bad_rank:
            message = (rf"layer '{re.escape(layer)}' \({mode} shard of rank {bad_rank} of 2\): scales: expected "
                       "finite values")
        else:
            message = (rf"^{re.escape(str(directory))}: rank {bad_rank} of 2 could not build its tensor-parallel "
                       rf"layers .*rank {rank} built its own, but the model was left unchanged on every rank$")
        with pytest.raises(ValueError, match=message):
            patch_model_tp(model, directory)
        unchanged((mode, rank))
    # An error that is not about the checkpoint (rank 1 passes no model) reaches rank 0 as a RuntimeError.
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**NARROW)).eval()
    unchanged = _model_snapshot(model)
    if rank == 1:
        with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
            patch_model_tp(None, cases[0][0])
    else:
        with pytest.raises(RuntimeError, match="rank 1 of 2 could not build its tensor-parallel layers"):
            patch_model_tp(model, cases[0][0])
    unchanged(("no model", rank))


def test_patch_model_tp_raises_on_every_rank_when_one_rank_fails(tmp_path):
    """Bad scales only in the columns or the rows that one rank owns: that rank raises its own error, the other
    learns of it from the one all-reduce before any module is replaced and raises naming the failed rank; no
    model changes, and no rank waits for a collective that the other never joins (short timeouts)."""
    pytest.importorskip("transformers")
    run_ranks(_one_rank_fails_worker, 2, _write_one_rank_spoilt_llamas(tmp_path), timeout=120,
              collective_timeout=datetime.timedelta(seconds=30))


# ------------------------------------------------------------------------------------------------ NCCL
def _two_gpus():
    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


def _nccl_worker(rank, world_size, directories):
    """Row and column layers of every case on the GPU kernels, eager and replayed from a CUDA graph that holds
    the NCCL all-reduce, against the float32 reference; then the tiny Llama in fp16."""
    from cupyq.distributed import ColumnParallelQuantLinear, RowParallelQuantLinear, patch_model_tp, shard_exl2, shard_gptq
    from cupyq.model import patch_model

    dev = torch.device("cuda", rank)
    for case in LAYER_CASES:
        fmt, settings = LAYER_CASES[case]
        full = _layer(case)
        bits = settings.get("bits") if fmt == "gptq" else None
        extra = {"checkpoint_format": settings["checkpoint_format"]} if fmt == "gptq" else {}
        w = _qmatrix({**full, **extra}, fmt, bits).reference_weight()
        b = full["bias"].astype(np.float32)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).half()
        ref = x.float().numpy() @ w + b
        dense16 = (x.to(dev) @ torch.from_numpy(w).half().to(dev)).float().cpu().numpy() + b
        floor = 2 * np.abs(dense16 - ref).max() + 1e-2 * np.abs(ref).max()
        if fmt == "gptq":
            row = {**shard_gptq(full, rank=rank, world_size=world_size, mode="row", bits=bits), **extra}
            col = {**shard_gptq(full, rank=rank, world_size=world_size, mode="column", bits=bits), **extra}
            qm_row = QMatrix.from_gptq(row["qweight"], row["qzeros"], row["scales"], row["g_idx"], bits=bits,
                                       checkpoint_format=extra["checkpoint_format"], device=rank)
            qm_col = QMatrix.from_gptq(col["qweight"], col["qzeros"], col["scales"], col["g_idx"], col["bias"],
                                       bits=bits, checkpoint_format=extra["checkpoint_format"], device=rank)
        else:
            row = shard_exl2(full, rank=rank, world_size=world_size, mode="row")
            col = shard_exl2(full, rank=rank, world_size=world_size, mode="column")
            parts = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
            qm_row = QMatrix.from_exl2(*(row[p] for p in parts), device=rank, in_features=K // world_size)
            qm_col = QMatrix.from_exl2(*(col[p] for p in parts), col["bias"], device=rank)
        row_layer = RowParallelQuantLinear(qm_row, torch.from_numpy(row["bias"]).to(dev))
        col_layer = ColumnParallelQuantLinear(qm_col, gather_output=True)
        rows = slice(rank * K // world_size, (rank + 1) * K // world_size)
        x_row, x_col = x[:, rows].contiguous().to(dev), x.to(dev)
        for name, layer, xin in (("row", row_layer, x_row), ("column", col_layer, x_col)):
            got = layer(xin).float().cpu().numpy()
            assert np.abs(got - ref).max() <= floor, (case, name, rank, np.abs(got - ref).max(), floor)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            row_layer(x_row)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = row_layer(x_row)
        graph.replay()
        torch.cuda.synchronize()
        assert np.abs(y.float().cpu().numpy() - ref).max() <= floor, (case, "row graph", rank)

    ids = torch.randint(0, LLAMA["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))
    for directory in directories:
        with torch.no_grad():
            ref = patch_model(_llama(1), directory).float()(ids).logits
            whole = patch_model(_llama(1).half().to(dev), directory)(ids.to(dev)).logits.float().cpu()
            tp = patch_model_tp(_llama(2).half().to(dev), directory)(ids.to(dev)).logits.float().cpu()
        err_tp, err_whole = _relative(tp, ref), _relative(whole, ref)
        # fp16 partial outputs are summed after rounding: allow twice the unsharded fp16 error plus a floor.
        assert err_tp <= 2 * err_whole + 2e-3, (str(directory), rank, err_tp, err_whole)


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs")
def test_parallel_layers_on_two_gpus_with_nccl(tmp_path):
    pytest.importorskip("transformers")
    directories = [_write_llama(tmp_path / kind, kind) for kind in ("gptq", "exl2")]
    run_ranks(_nccl_worker, 2, directories, backend="nccl")


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs")
def test_patch_model_tp_raises_on_every_rank_when_one_rank_fails_with_nccl(tmp_path):
    """The same agreement over NCCL: its all-reduce runs on each rank's current CUDA device."""
    pytest.importorskip("transformers")
    run_ranks(_one_rank_fails_worker, 2, _write_one_rank_spoilt_llamas(tmp_path), timeout=120, backend="nccl",
              collective_timeout=datetime.timedelta(seconds=30))


# ------------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("kind", ["gptq", "awq"])
def test_patch_model_tp_without_a_process_group_is_patch_model(tmp_path, kind):
    """torch.distributed not initialised means one rank: the parallel modules hold whole layers."""
    pytest.importorskip("transformers")
    from cupyq.distributed import ColumnParallelQuantLinear, RowParallelQuantLinear, patch_model_tp
    from cupyq.model import patch_model

    settings = LLAMA_BIASES if kind == "awq" else LLAMA
    directory = _write_llama(tmp_path, kind, settings)
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = patch_model(_llama(1, settings), directory)(ids).logits
        sharded = patch_model_tp(_llama(2, settings), directory)
        got = sharded(ids).logits
    mlp = sharded.model.layers[0].mlp
    assert isinstance(mlp.up_proj, ColumnParallelQuantLinear) and isinstance(mlp.down_proj, RowParallelQuantLinear)
    assert _relative(got, ref) < 1e-6


def test_shard_qmatrix_names_a_layer_of_another_format(tmp_path):
    """Only GPTQ, EXL2 and AWQ layers have shards; a plain weight (the fp16 lm_head) is refused by name."""
    pytest.importorskip("transformers")
    from cupyq.checkpoint import open_checkpoint
    from cupyq.distributed import shard_qmatrix

    ckpt = open_checkpoint(_write_llama(tmp_path, "awq"))
    with pytest.raises(ValueError, match=r"layer 'lm_head' has format 'fp16'; only 'gptq', 'exl2', 'awq' layers "
                                         r"can be sharded"):
        shard_qmatrix(ckpt, "lm_head", rank=0, world_size=2, mode="column")


def test_patch_model_tp_rejects_heads_that_do_not_split(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from cupyq.distributed import layers, patch_model_tp

    directory = _write_llama(tmp_path, "gptq")
    monkeypatch.setattr(layers, "group_rank_and_size", lambda group=None: (0, 3))
    model = _llama(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="num_attention_heads = 4 is not a multiple of the world size 3"):
        patch_model_tp(model, directory)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def _row_layer_case(seed):
    """A GPTQ QMatrix (K x N, no bias) and its float32 reference weight."""
    rng = np.random.default_rng(seed)
    t = quantize_gptq(rng.standard_normal((K, N)).astype(np.float32), bits=4, group_size=32, act_order=True,
                      importance=rng.random(K))
    qm = QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    return qm, qm.reference_weight()


@pytest.mark.parametrize("bias, error, message", [
    (torch.tensor([float("nan")] * N), ValueError, "bias: expected finite values"),
    (torch.full((N,), 1e6), ValueError, "bias: expected magnitudes of at most 65504"),
    (torch.ones(1, N), ValueError, rf"bias: expected shape \({N},\), got \(1, {N}\)"),
    (torch.arange(N), TypeError, "bias: expected dtype float16, bfloat16, float32 or float64, got int64"),
])
def test_row_parallel_layer_checks_its_bias_by_the_bias_rule(bias, error, message):
    """The bias a row layer adds after the reduce obeys the rule of every QMatrix bias (a column layer's is
    inside its QMatrix); a bias that passes is added once, in x's dtype."""
    from cupyq.distributed import RowParallelQuantLinear

    qm, w = _row_layer_case(11)
    with pytest.raises(error, match=message):
        RowParallelQuantLinear(qm, bias)
    rng = np.random.default_rng(12)
    b = rng.standard_normal(N).astype(np.float16)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = RowParallelQuantLinear(qm, torch.from_numpy(b))(torch.from_numpy(x))
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    ref = x @ w + b.astype(np.float32)
    assert np.abs(y.numpy() - ref).max() <= 1e-4 * np.abs(ref).max()


def _spoil_tensor(directory, name, index, value):
    """Set ``name[index]`` in a checkpoint's model.safetensors to ``value``."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    file = str(Path(directory) / "model.safetensors")
    with safe_open(file, "np") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors[name][index] = value
    save_file(tensors, file, metadata=metadata)
    return directory


def test_patch_model_tp_refuses_a_nan_row_bias_naming_the_layer(tmp_path):
    """A NaN in o_proj's bias (a row layer, whose bias is added after the reduce, outside its QMatrix) is refused
    as patch_model refuses it, naming the layer; the model is unchanged."""
    pytest.importorskip("transformers")
    from cupyq.distributed import patch_model_tp
    from cupyq.model import patch_model

    layer = "model.layers.1.self_attn.o_proj"
    directory = _spoil_tensor(_write_llama(tmp_path, "gptq", LLAMA_BIASES), f"{layer}.bias", 7, np.nan)
    with pytest.raises(ValueError, match="bias"):
        patch_model(_llama(2, LLAMA_BIASES), directory)
    model = _llama(2, LLAMA_BIASES)
    unchanged = _model_snapshot(model)
    with pytest.raises(ValueError, match=rf"layer '{re.escape(layer)}' \(row shard of rank 0 of 1\): bias: expected "
                                         r"finite values"):
        patch_model_tp(model, directory)
    unchanged("nan bias")


def test_patch_model_tp_refuses_a_model_patched_before(tmp_path):
    pytest.importorskip("transformers")
    from cupyq.distributed import patch_model_tp
    from cupyq.model import patch_model

    directory = _write_llama(tmp_path, "gptq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for first in (patch_model, patch_model_tp):
            model = first(_llama(2), directory)
            with pytest.raises(ValueError, match=r"14 quantized layer\(s\) are already cupyq QuantizedLinear modules "
                                                 r"\(the model was patched before\)"):
                patch_model_tp(model, directory)


def test_patch_model_tp_warns_about_biases_the_checkpoint_lacks(tmp_path):
    """A model whose projections have biases, a checkpoint without them: the biases are dropped with patch_model's
    warning, and the logits are patch_model's."""
    pytest.importorskip("transformers")
    from cupyq.distributed import patch_model_tp
    from cupyq.model import patch_model

    directory = _write_llama(tmp_path, "gptq")
    ids = torch.randint(0, LLAMA["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        ref = patch_model(_llama(1, LLAMA_BIASES), directory)(ids).logits
        with pytest.warns(UserWarning, match=r"14 model bias\(es\) dropped: .*model\.layers\.0\.mlp\.down_proj\.bias"):
            got = patch_model_tp(_llama(2, LLAMA_BIASES), directory)(ids).logits
    assert _relative(got, ref) < 1e-6


def test_patch_model_tp_refuses_a_model_on_the_meta_device(tmp_path):
    """patch_model_tp copies the checkpoint into the model's tensors: a meta model would stay meta (and give
    meta logits), so it is refused before anything is built."""
    pytest.importorskip("transformers")
    from cupyq.distributed import patch_model_tp

    directory = _write_llama(tmp_path, "gptq")
    with torch.device("meta"):
        model = _llama(2)
    with pytest.raises(ValueError, match=r"model tensor\(s\) are on the meta device: model\.embed_tokens\.weight.*build "
                                         r"the model on the CPU or a GPU"):
        patch_model_tp(model, directory, device="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


@pytest.mark.parametrize("arguments, error, message", [
    (dict(model=5), TypeError, "^model: expected a torch.nn.Module"),
    (dict(ckpt=5), TypeError, "^ckpt: expected a checkpoint directory"),
    (dict(column="q_proj"), TypeError, r"^column: expected a tuple of module names .*got str 'q_proj'"),
    (dict(row=("o_proj", 3)), TypeError, r"^row: expected a tuple of module names"),
    (dict(column=("q_proj", "o_proj")), ValueError, r"^column, row: .* not both; \['o_proj'\] are in both"),
])
def test_patch_model_tp_names_an_argument_of_the_wrong_type(tmp_path, arguments, error, message):
    """A single string for ``column`` would match names by substring; every such argument is refused by name
    and the model is unchanged."""
    pytest.importorskip("transformers")
    from cupyq.distributed import patch_model_tp

    model = _llama(2)
    unchanged = _model_snapshot(model)
    call = {"model": model, "ckpt": _write_llama(tmp_path, "gptq"), **arguments}
    with pytest.raises(error, match=message):
        patch_model_tp(call.pop("model"), call.pop("ckpt"), **call)
    unchanged(str(arguments))


def _outside_group_worker(rank, world_size):
    from cupyq.distributed import ColumnParallelQuantLinear, RowParallelQuantLinear, patch_model_tp

    only_rank_0 = dist.new_group([0])  # every rank must call new_group, members or not
    qm, _ = _row_layer_case(13)
    if rank == 0:
        assert RowParallelQuantLinear(qm, group=only_rank_0).world_size == 1
        return
    message = r"^group: this process \(global rank 1\) is not a member of the process group"
    for build in (lambda: RowParallelQuantLinear(qm, group=only_rank_0),
                  lambda: ColumnParallelQuantLinear(qm, gather_output=True, group=only_rank_0),
                  lambda: patch_model_tp(torch.nn.Linear(2, 2), "unused", group=only_rank_0)):
        with pytest.raises(ValueError, match=message):
            build()


def test_parallel_layers_refuse_a_group_this_process_is_not_in():
    """torch gives a process outside the group rank -1 and world size -1: a row layer would skip the all-reduce
    and return its partial product. It is refused, naming the group, before anything is built."""
    run_ranks(_outside_group_worker, 2, timeout=120, collective_timeout=datetime.timedelta(seconds=30))


def test_patch_model_tp_accepts_a_replicated_exl2_lm_head_stored_padded(tmp_path):
    """An EXL2 lm_head of 250 outputs stored 256 wide (converters pad N to a multiple of 32): replicated, it drops
    the padding columns as patch_model's layer does, and the logits are patch_model's."""
    pytest.importorskip("transformers")
    from cupyq.checkpoint import save_exl2
    from cupyq.distributed import patch_model_tp
    from cupyq.model import patch_model
    from cupyq.torch_ops import TrimmedQuantizedLinear

    settings = dict(LLAMA, vocab_size=250)
    source, rng = _llama(0, settings), np.random.default_rng(9)
    layers = {}
    for name, lin in source.named_modules():
        if isinstance(lin, torch.nn.Linear) and ".layers." in name:
            widths, props = EXL2_RECIPE[name.rsplit(".", 1)[1]]
            layers[name] = quantize_exl2(lin.weight.detach().numpy().T, bits=widths, proportions=props)
    head = np.zeros((LLAMA["hidden_size"], 256), dtype=np.float32)
    head[:, :250] = source.lm_head.weight.detach().numpy().T
    layers["lm_head"] = quantize_exl2(head, bits=(6,), proportions=(1.0,), importance=rng.random(head.shape[0]))
    quantized = {f"{n}.weight" for n in layers}
    extras = {k: v.detach().numpy() for k, v in source.state_dict().items() if k not in quantized}
    directory = save_exl2(tmp_path, layers, extra_tensors=extras)
    ids = torch.randint(0, 250, (2, 5), generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = patch_model(_llama(1, settings), directory)(ids).logits
        sharded = patch_model_tp(_llama(2, settings), directory)
        got = sharded(ids).logits
    assert type(sharded.lm_head) is TrimmedQuantizedLinear and got.shape == (2, 5, 250)
    assert _relative(got, ref) < 1e-6


def test_shard_qmatrix_takes_a_checkpoint_directory_or_names_ckpt(tmp_path):
    """A directory, as patch_model_tp takes it, gives the shard of the open checkpoint; anything else is a
    TypeError naming ``ckpt``."""
    pytest.importorskip("transformers")
    from cupyq.checkpoint import open_checkpoint
    from cupyq.distributed import shard_qmatrix

    directory = _write_llama(tmp_path, "awq", LLAMA_BIASES)
    name = "model.layers.1.mlp.down_proj"
    for mode in ("column", "row"):
        qm, bias = shard_qmatrix(directory, name, rank=1, world_size=2, mode=mode)
        want, want_bias = shard_qmatrix(open_checkpoint(directory), name, rank=1, world_size=2, mode=mode)
        np.testing.assert_array_equal(qm.reference_weight(), want.reference_weight())
        assert (bias is None) == (mode == "column") and (bias is None or np.array_equal(bias, want_bias))
    with pytest.raises(TypeError, match="^ckpt: expected a checkpoint directory .* got int"):
        shard_qmatrix(5, name, rank=0, world_size=2, mode="row")
