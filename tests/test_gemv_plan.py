"""The split-K choice of the small-batch kernel (a pure function of the shape and the GPU's capacity)."""

import pytest

from cupyq.plans import _GEMV_SMEM_LIMIT, _WAVE_OVERHEAD_STEPS, _gemv_splits


def h200(smem):  # two CTAs per multiprocessor while both fit in its shared memory, 132 multiprocessors
    return 132 * (2 if smem <= _GEMV_SMEM_LIMIT else 1)


def _smem(m, steps, ctype):
    """qgemv's shared memory as its source comment gives it: fp16 activations (rows padded by 8), 5 ints of
    groups per chunk, and for bf16 a word per batch row and step and one per batch row."""
    return m * (steps * 256 + 8) * 2 + 5 * steps * 4 * 4 + (m * (steps + 1) * 4 if ctype == "__nv_bfloat16" else 0)


@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672),
                                 (28672, 8192), (256, 64), (65536, 1024)])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("ctype", ["__half", "__nv_bfloat16"])
def test_splits_cover_the_rows_and_fit(k, n, m, ctype):
    steps, col_blocks = k // 256, -(-(n // 16) // 8)
    splits, per_split, smem = _gemv_splits(steps, col_blocks, m, h200, ctype)
    # every step is in exactly one split, and the last split is not empty
    assert (splits - 1) * per_split < steps <= splits * per_split
    assert smem == _smem(m, per_split, ctype) <= _GEMV_SMEM_LIMIT
    # no other split count is cheaper by the cost model
    waves = -(-(col_blocks * splits) // h200(smem))
    cost = waves * (per_split + _WAVE_OVERHEAD_STEPS)
    for s in range(1, steps + 1):
        p = -(-steps // s)
        sm = _smem(m, p, ctype)
        if sm <= _GEMV_SMEM_LIMIT:
            assert cost <= -(-(col_blocks * -(-steps // p)) // h200(sm)) * (p + _WAVE_OVERHEAD_STEPS)


def test_one_wave_when_it_fits():
    # 4096 x 14336: 112 column blocks; two splits fill 224 of 264 CTA slots in one wave
    assert _gemv_splits(16, 112, 1, h200)[:2] == (2, 8)
    # 8192 x 28672: 224 column blocks, one split (two would need a second wave)
    assert _gemv_splits(32, 224, 1, h200)[:2] == (1, 32)
    # 8 rows of 8192 activations do not fit next to each other in shared memory: two splits, two waves
    assert _gemv_splits(32, 224, 8, h200)[:2] == (2, 16)


def test_empty_matrix_has_no_plan():
    assert _gemv_splits(0, 1, 1, h200) is None
