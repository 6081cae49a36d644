"""Array-level knowledge of the GPTQ, EXL2 and AWQ checkpoint layouts (NumPy or CuPy through ``xp``)."""

from cupyq.formats.awq import (
    AWQ_PACK_ORDER,
    AWQLayout,
    check_awq,
    pack_awq_columns,
    unpack_awq_columns,
)
from cupyq.formats.bitstream import (
    pack_bitstream,
    pack_bitstream_columns,
    unpack_bitstream,
    unpack_bitstream_columns,
)
from cupyq.formats.common import array_module, require_dtype, require_shape
from cupyq.formats.exl2 import (
    EXL2_BITS,
    Exl2Group,
    Exl2Layout,
    check_exl2,
    decode_scales,
    encode_scale_codes,
    make_group_map,
    pack_q_weight,
    parse_q_groups,
    perm_from_invperm,
    unpack_q_weight,
)
from cupyq.formats.gptq import (
    GPTQ_BITS,
    GPTQLayout,
    check_gptq,
    default_g_idx,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)

__all__ = [
    "array_module",
    "require_dtype",
    "require_shape",
    "pack_bitstream",
    "unpack_bitstream",
    "pack_bitstream_columns",
    "unpack_bitstream_columns",
    "GPTQ_BITS",
    "GPTQLayout",
    "unpack_qweight",
    "pack_qweight",
    "unpack_qzeros",
    "pack_qzeros",
    "default_g_idx",
    "check_gptq",
    "EXL2_BITS",
    "Exl2Group",
    "Exl2Layout",
    "parse_q_groups",
    "make_group_map",
    "perm_from_invperm",
    "unpack_q_weight",
    "pack_q_weight",
    "decode_scales",
    "encode_scale_codes",
    "check_exl2",
    "AWQ_PACK_ORDER",
    "AWQLayout",
    "pack_awq_columns",
    "unpack_awq_columns",
    "check_awq",
]
