"""Round-to-nearest quantizer producing GPTQ, EXL2 and AWQ checkpoint tensors (NumPy).

This is not GPTQ's error-compensating solver: every weight is rounded to the nearest level of its
group's grid. It exists to make realistic checkpoints of any shape and configuration for tests,
benchmarks and demos; the tensors it returns are laid out exactly as GPTQ / EXL2 files store them.

Weights are ``[K, N]`` = ``[in_features, out_features]`` (the transpose of ``torch.nn.Linear.weight``),
so ``y = x @ W``.

Every quantizer keeps the layer within float16, as the GPU kernels compute it: weights whose scales or
dequantised values ``|scale * (q - zero)|`` exceed 65504 raise ValueError naming the largest value; nonzero
groups that need a scale below float16's smallest (2**-24) get that scale and round (partly) to zero, with one
RuntimeWarning per call; all-zero groups get scale 1.0 and stay exact.
"""

from cupyq.quantize.awq import quantize_awq
from cupyq.quantize.common import relative_error
from cupyq.quantize.exl2 import exl2_group_plan, quantize_exl2
from cupyq.quantize.gptq import quantize_gptq

__all__ = ["quantize_gptq", "quantize_exl2", "quantize_awq", "exl2_group_plan", "relative_error"]
