"""Quantisation settings of a checkpoint directory: :class:`QuantConfig` and :func:`read_quant_config`.

GPTQ (AutoGPTQ, GPTQModel, optimum), EXL2 and AWQ (AutoAWQ, transformers) settings, from
``quantize_config.json``, ``quant_config.json`` or ``config.json["quantization_config"]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from cupyq.checkpoint.errors import _fail, _read_json
from cupyq.formats.common import is_int

__all__ = ["QUANT_CONFIG_FILES", "QuantConfig", "read_quant_config", "v1_zero_encoding"]

QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json", "config.json")

_GPTQ_BITS = (2, 3, 4, 8)
_GPTQ_FORMATS = ("gptq", "gptq_v2")
# Loading hints older transformers/optimum wrote into checkpoints: not part of the format.
_IGNORED_HINTS = (
    "use_exllama",
    "exllama_config",
    "disable_exllama",
    "use_cuda_fp16",
    "max_input_length",
    "backend",
)
_AWQ_VERSIONS = ("gemm",)
# Loading hints transformers writes into AWQ configs: not part of the format.
_AWQ_HINTS = ("backend", "do_fuse", "fuse_max_seq_len", "modules_to_fuse", "exllama_config")
# AWQ backends whose checkpoints transformers reads with another layer (llm-awq's: int16 qweight, scaled_zeros),
# not GEMM-packed whatever 'version' says.
_AWQ_OWN_LAYOUT_BACKENDS = ("llm-awq",)


@dataclass(frozen=True)
class QuantConfig:
    """Quantisation settings of a checkpoint, normalised from any of the accepted files.

    Attributes:
        quant_method: ``"gptq"``, ``"exl2"`` or ``"awq"``.
        source: the file the settings came from (``config.json`` means its ``quantization_config``).
        bits: GPTQ / AWQ bit width (int) or the EXL2 target bits per weight (float, informational); or None.
        group_size: GPTQ / AWQ rows per group, -1 for one group, None when the config does not say
            (then it is inferred per layer from the tensor shapes).
        desc_act: GPTQ act-order flag. sym: symmetric flag (True when missing; AWQ: ``not zero_point``).
        checkpoint_format: ``"gptq"`` (v1 zeros, stored z-1) or ``"gptq_v2"``; None for AWQ.
        dynamic: GPTQModel per-module overrides ``{"+:regex" | "regex": {...}, "-:regex": {}}``; their bits,
            group_size, desc_act and sym are checked as the top-level keys are.
        head_bits: EXL2 ``head_bits`` (informational).
        hints: loading hints found in the file (``use_exllama``...), accepted and ignored.
        raw: the parsed JSON object.
        version: AWQ packing version, lower case (``"gemm"``, the only one supported); None otherwise.
        modules_to_not_convert: AWQ modules kept dense (a module is kept when one entry is a substring
            of its name, as transformers matches them); ``()`` otherwise.
    """

    quant_method: str
    source: Path
    bits: object = None
    group_size: object = None
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    dynamic: dict = field(default_factory=dict)
    head_bits: object = None
    hints: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    version: str | None = None
    modules_to_not_convert: tuple = ()

    def keeps_dense(self, name) -> bool:
        """True when ``modules_to_not_convert`` keeps module ``name`` unquantized."""
        return any(key in name for key in self.modules_to_not_convert)

    def for_layer(self, name):
        """(bits, group_size, desc_act, sym) for module ``name`` after ``dynamic`` overrides.

        Returns None when a ``-:`` rule excludes the module from quantisation.
        """
        bits, gs, act, sym = self.bits, self.group_size, self.desc_act, self.sym
        for pattern, override in self.dynamic.items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
            if re.match(regex, name):
                if negative:
                    return None
                bits = override.get("bits", bits)
                gs = override.get("group_size", gs)
                act = override.get("desc_act", act)
                sym = override.get("sym", sym)
        return bits, gs, act, sym


def _quantizers(raw):
    """The ``meta.quantizer`` entries of a quantization config as ``[(tool, version tuple)]``."""
    meta = raw.get("meta") if isinstance(raw, dict) else None
    entries = meta.get("quantizer") if isinstance(meta, dict) else None
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        return []
    found = []
    for entry in entries:
        if not isinstance(entry, str):
            continue
        tool, _, version = entry.partition(":")
        numbers = tuple(int(m) for m in re.findall(r"\d+", version.split("+")[0])[:3])
        found.append((tool.strip().lower(), numbers))
    return found


def v1_zero_encoding(quant_config):
    """How the producer of a v1 GPTQ checkpoint applied the stored ``z - 1``, from ``meta.quantizer``.

    ``"word"`` for GPTQModel 0.9.0 or later (it subtracts a per-field constant from each packed word, see
    :mod:`cupyq.formats.gptq`), ``"field"`` for cupyq's own writer, None when the config does not name a
    producer whose encoding is known (such files are read per field; :func:`zero_point_warnings` says where
    that reading is uncertain). quant_config: a :class:`QuantConfig` or None.
    """
    if quant_config is None or quant_config.quant_method != "gptq":
        return None
    tools = _quantizers(quant_config.raw)
    if any(tool == "gptqmodel" and version >= (0, 9, 0) for tool, version in tools):
        return "word"
    if any(tool == "cupyq" for tool, _ in tools):
        return "field"
    return None


def _bits_value(bits, key, bad):
    if not is_int(bits) or bits not in _GPTQ_BITS:
        bad(key, f"expected one of {_GPTQ_BITS}, got {bits!r}")
    return int(bits)


def _group_size_value(gs, key, bad):
    """int group size or None (not given: inferred per layer from the shapes)."""
    if gs is not None and (not is_int(gs) or not (gs == -1 or gs > 0)):
        bad(key, f"expected -1 or a positive integer, got {gs!r}")
    return None if gs is None else int(gs)


def _flag_value(flag, key, bad):
    if not isinstance(flag, bool):
        bad(key, f"expected true or false, got {flag!r}")
    return flag


def _gptq_format(d, bad):
    """The lower-case checkpoint format of a GPTQ config object from ``format`` or its alias ``checkpoint_format``."""
    fmt = d.get("format")
    alias = d.get("checkpoint_format")
    if fmt is not None and alias is not None and str(fmt).lower() != str(alias).lower():
        bad("format", f"'format' is {fmt!r} but 'checkpoint_format' is {alias!r}")
    fmt = fmt if fmt is not None else alias
    fmt = "gptq" if fmt is None else fmt
    if not isinstance(fmt, str) or fmt.lower() not in _GPTQ_FORMATS:
        bad("format", f"expected one of {_GPTQ_FORMATS}, got {fmt!r} (marlin/gptq_p checkpoints are not supported)")
    return fmt.lower()


# The keys a GPTQModel 'dynamic' override may set, each checked by the rule of the top-level key; other keys are
# ignored, as unknown top-level keys are.
_OVERRIDE_RULES = {"bits": _bits_value, "group_size": _group_size_value, "desc_act": _flag_value, "sym": _flag_value}


def _parse_dynamic(dynamic, fmt, source):
    """The ``dynamic`` overrides with every value checked as its top-level key is: ``{pattern: {key: value}}``."""

    def bad_dynamic(problem):
        _fail(source, f"quantization config key 'dynamic': {problem}")

    dynamic = dynamic or {}
    if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
        bad_dynamic(f"expected an object of pattern -> overrides, got {dynamic!r}")
    parsed = {}
    for pattern, override in dynamic.items():
        try:
            re.compile(pattern[2:] if pattern[:2] in ("+:", "-:") else pattern)
        except re.error as exc:
            bad_dynamic(f"pattern {pattern!r} is not a valid regular expression ({exc})")

        def bad(key, problem, pattern=pattern):
            bad_dynamic(f"pattern {pattern!r}, key '{key}': {problem}")

        parsed[pattern] = dict(override)
        for key, rule in _OVERRIDE_RULES.items():
            if key in override:
                parsed[pattern][key] = rule(override[key], key, bad)
        if "format" in override or "checkpoint_format" in override:
            own = _gptq_format(override, bad)
            if own != fmt:  # for_layer applies one format to every module
                bad("format", f"per-module checkpoint formats are not supported: {own!r} here, {fmt!r} for the model")
    return parsed


def _parse_gptq_config(d, source) -> QuantConfig:
    def bad(key, problem):
        _fail(source, f"quantization config key '{key}': {problem}")

    fmt = _gptq_format(d, bad)
    if "bits" not in d:
        bad("bits", "missing")
    hints = {k: d[k] for k in _IGNORED_HINTS if k in d}
    return QuantConfig(
        "gptq",
        Path(source),
        bits=_bits_value(d["bits"], "bits", bad),
        group_size=_group_size_value(d.get("group_size"), "group_size", bad),
        desc_act=_flag_value(d.get("desc_act", False), "desc_act", bad),
        sym=_flag_value(d.get("sym", True), "sym", bad),
        checkpoint_format=fmt,
        dynamic=_parse_dynamic(d.get("dynamic"), fmt, source),
        hints=hints,
        raw=dict(d),
    )


def _parse_awq_config(d, source) -> QuantConfig:
    """transformers / GPTQModel (``bits``, ``group_size``, ``zero_point``, ``version`` or ``format``) and
    AutoAWQ ``quant_config.json`` (``w_bit``, ``q_group_size``, ``zero_point``, ``version``) settings."""

    def bad(key, problem):
        _fail(source, f"quantization config key '{key}': {problem}")

    def one_of(*keys):
        present = [k for k in keys if d.get(k) is not None]
        values = {json.dumps(d[k]).lower() for k in present}
        if len(values) > 1:
            bad(present[0], " but ".join(f"'{k}' is {d[k]!r}" for k in present))
        return (present[0], d[present[0]]) if present else (keys[0], None)

    key, version = one_of("version", "format")
    version = "gemm" if version is None else version
    if not isinstance(version, str) or version.lower() not in _AWQ_VERSIONS:
        bad(key, f"AWQ version {version!r} is not supported; only GEMM-packed AWQ checkpoints ('gemm') are "
                 "(GEMV, GEMV_FAST and the other versions store different layouts)")
    backend = d.get("backend")
    if isinstance(backend, str) and backend.lower() in _AWQ_OWN_LAYOUT_BACKENDS:
        bad("backend", f"{backend!r} stores llm-awq's own packing, which is not supported; only GEMM-packed AWQ "
                       "checkpoints (AutoAWQ, backend 'autoawq') are")
    key, bits = one_of("bits", "w_bit")
    if bits is None:
        bad("bits", "missing (an AWQ config gives 'bits' or 'w_bit')")
    if not is_int(bits) or bits != 4:
        bad(key, f"AWQ GEMM checkpoints are 4-bit, got {bits!r}")
    key, gs = one_of("group_size", "q_group_size")
    gs = _group_size_value(gs, key, bad)
    # Informational: the zero points are read from each layer's qzeros whatever this says.
    zero_point = _flag_value(d.get("zero_point", True), "zero_point", bad)
    keep = d.get("modules_to_not_convert") or []
    if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
        bad("modules_to_not_convert", f"expected a list of module names or null, got {keep!r}")
    return QuantConfig(
        "awq",
        Path(source),
        bits=4,
        group_size=gs,
        sym=not zero_point,
        checkpoint_format=None,
        hints={k: d[k] for k in _AWQ_HINTS if k in d},
        raw=dict(d),
        version=version.lower(),
        modules_to_not_convert=tuple(keep),
    )


def _parse_quant_config(d, source) -> QuantConfig:
    if not isinstance(d, dict):
        _fail(source, f"quantization config must be a JSON object, got {type(d).__name__}")
    method = d.get("quant_method", d.get("method"))
    method = method.lower() if isinstance(method, str) else method
    if method == "awq" or (method is None and ("zero_point" in d or "w_bit" in d)):
        return _parse_awq_config(d, source)
    if method == "exl2":
        bits = d.get("bits")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float))):
            _fail(source, f"quantization config key 'bits': expected a number (bits per weight), got {bits!r}")
        return QuantConfig("exl2", Path(source), bits=bits, head_bits=d.get("head_bits"), raw=dict(d))
    if method not in (None, "gptq"):
        _fail(source, f"quantization config key 'quant_method': expected 'gptq', 'exl2' or 'awq', got {method!r}")
    return _parse_gptq_config(d, source)


def _stated(keys, value):
    """A decoding setting of a QuantConfig: ``value(config)``, or None when its JSON gives none of ``keys``."""
    return lambda c: value(c) if any(c.raw.get(k) is not None for k in keys) else None


# The settings that change how a method's tensors decode, as two config sources must agree on them. A setting
# is compared only when both sources state it.
_DECODING_SETTINGS = {
    "gptq": {
        "bits": _stated(("bits",), lambda c: c.bits),
        "group_size": _stated(("group_size",), lambda c: c.group_size),
        "desc_act": _stated(("desc_act",), lambda c: c.desc_act),
        "sym": _stated(("sym",), lambda c: c.sym),
        "checkpoint_format": _stated(("format", "checkpoint_format"), lambda c: c.checkpoint_format),
        "dynamic": _stated(("dynamic",), lambda c: c.dynamic),
        "v1 zero encoding (meta.quantizer)": lambda c: v1_zero_encoding(c) if c.checkpoint_format == "gptq" else None,
    },
    "awq": {
        "bits": _stated(("bits", "w_bit"), lambda c: c.bits),
        "group_size": _stated(("group_size", "q_group_size"), lambda c: c.group_size),
        "zero_point": _stated(("zero_point",), lambda c: not c.sym),
        "version": _stated(("version", "format"), lambda c: c.version),
    },
    "exl2": {},  # its config is informational: the tensors say everything
}


def _source_name(quant_config):
    name = quant_config.source.name
    return f"{name} quantization_config" if name == "config.json" else name


def _check_agree(used, other):
    """Fail naming both files and every decoding setting on which two config sources of a directory differ."""
    if used.quant_method != other.quant_method:
        diffs = [("quant_method", used.quant_method, other.quant_method)]
    else:
        settings = _DECODING_SETTINGS[used.quant_method].items()
        diffs = [(key, value(used), value(other)) for key, value in settings]
        diffs = [(key, a, b) for key, a, b in diffs if a is not None and b is not None and a != b]
    if diffs:
        a_name, b_name = _source_name(used), _source_name(other)
        listed = "; ".join(f"{key} is {a!r} in {a_name} but {b!r} in {b_name}" for key, a, b in diffs)
        _fail(used.source, f"the quantization settings disagree with {other.source}: {listed} "
                           "(the files decode the tensors differently; correct or remove one of them)")


def _config_sources(directory):
    """``[(path, quantization config JSON)]`` of every config source present, in search order."""
    sources = []
    for name in QUANT_CONFIG_FILES:
        path = directory / name
        if not path.is_file():
            continue
        d = _read_json(path)
        if name == "config.json":
            if not isinstance(d, dict):
                _fail(path, "config.json must be a JSON object")
            if d.get("quantization_config") is None:
                continue
            d = d["quantization_config"]
        sources.append((path, d))
    return sources


def read_quant_config(directory):
    """The quantisation config of a checkpoint directory, or None when it has none.

    Looks in ``quantize_config.json``, then ``quant_config.json``, then ``config.json`` key
    ``quantization_config`` (the order AutoGPTQ, GPTQModel and TGI use) and returns the first found. Accepts
    ``format`` or its alias ``checkpoint_format``; reads and ignores the loading hints ``use_exllama``,
    ``exllama_config``, ``disable_exllama``, ``use_cuda_fp16``, ``max_input_length`` and ``backend``.
    AWQ settings come from the same places (AutoAWQ writes ``quant_config.json`` with ``w_bit`` /
    ``q_group_size``, transformers ``quantization_config`` with ``quant_method: awq``).
    Every source present is parsed, and they must agree on the settings that change how the tensors decode
    (quant method; GPTQ bits, group_size, desc_act, sym, checkpoint format, dynamic and the v1 zero encoding
    that meta.quantizer implies; AWQ bits, group_size, zero_point and version); a setting that only one
    source states is no conflict.
    Raises :class:`CheckpointError` for unparsable JSON, bad values, unsupported methods (Marlin, AWQ
    versions other than GEMM, AWQ backend ``llm-awq``) or sources that disagree (naming both files and every
    differing setting).
    """
    configs = [_parse_quant_config(d, path) for path, d in _config_sources(Path(directory))]
    for other in configs[1:]:
        _check_agree(configs[0], other)
    return configs[0] if configs else None
