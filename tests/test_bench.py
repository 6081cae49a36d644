"""cupyq.bench's formats: "gptq_bf16" (GPTQ with bfloat16 activations) is selectable from scripts/bench.py and
`cupyq bench`, the defaults stay gptq, gptq_act and exl2, and on a GPU it times bfloat16 calls."""

import inspect
import json

import pytest

import cupyq.bench
from cupyq import cli, device

DEFAULT_FORMATS = ("gptq", "gptq_act", "exl2")


def test_formats_and_defaults():
    assert cupyq.bench.FORMATS == ("gptq", "gptq_act", "exl2", "awq", "gptq_bf16")
    assert inspect.signature(cupyq.bench.run_benchmark).parameters["formats"].default == DEFAULT_FORMATS


def _fake_script_run(monkeypatch):
    seen = {}
    monkeypatch.setattr(cupyq.bench, "run_benchmark", lambda shapes, ms, **kwargs: seen.update(kwargs) or [])
    monkeypatch.setattr(cupyq.bench, "host_overhead", lambda: {})
    return seen


def test_script_selects_gptq_bf16_and_keeps_the_default(monkeypatch, capsys):
    seen = _fake_script_run(monkeypatch)
    cupyq.bench.main(["--formats", "gptq,gptq_bf16", "--baselines", "fp16"])
    assert seen["formats"] == ["gptq", "gptq_bf16"] and seen["baselines"] == ["fp16"]
    cupyq.bench.main([])
    assert tuple(seen["formats"]) == DEFAULT_FORMATS


def test_script_rejects_an_unknown_format_before_running(monkeypatch, capsys):
    seen = _fake_script_run(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cupyq.bench.main(["--formats", "gptq,bf16"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'bf16'" in err and "gptq_bf16" in err
    assert not seen


def test_cupyq_bench_selects_gptq_bf16(monkeypatch, capsys):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return [{"K": 64, "N": 32, "m": 1, "impl": "gptq_bf16", "us": 5.0},
                {"K": 64, "N": 32, "m": 1, "impl": "fp16", "us": 10.0}]

    monkeypatch.setattr(device, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(cupyq.bench, "run_benchmark", fake_run)
    code = cli.main(["bench", "--formats", "gptq", "gptq_bf16", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert seen["formats"] == ("gptq", "gptq_bf16")
    assert json.loads(out)["table"][0]["x_gptq_bf16"] == 2.0


def test_summary_table_has_a_gptq_bf16_column():
    rows = [{"K": 64, "N": 32, "m": 1, "impl": impl, "us": us}
            for impl, us in (("gptq", 5.0), ("awq", 5.5), ("gptq_bf16", 5.2), ("fp16", 10.0))]
    head = cupyq.bench.summarize(rows).splitlines()[0]
    assert head.index("awq µs") < head.index("gptq_bf16 µs") < head.index("fp16 µs")
    assert "| 5.2 |" in cupyq.bench.summarize(rows)


@pytest.mark.gpu
def test_gptq_bf16_times_bfloat16_calls(monkeypatch):
    """On a GPU: gptq_bf16 rows come with times, and every call of that format takes and returns bfloat16."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import cupyq

    gemm, calls = cupyq.gemm, []

    def recording_gemm(x, qm, *args, **kwargs):
        out = gemm(x, qm, *args, **kwargs)
        calls.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(cupyq, "gemm", recording_gemm)
    rows = cupyq.bench.run_benchmark([(256, 512)], [1, 16, 300], formats=("gptq", "gptq_bf16"), baselines=(),
                                     iters=4, repeats=1, rotate_bytes=1 << 20)
    assert [(r["impl"], r["m"]) for r in rows] == [(impl, m) for impl in ("gptq", "gptq_bf16") for m in (1, 16, 300)]
    assert all(r["us"] > 0 and r["graph_us"] > 0 for r in rows)
    assert {d for d, _ in calls} == {torch.float16, torch.bfloat16}
    assert all(x == out for x, out in calls)
    # the calls of the second format (after every float16 one) are all bfloat16
    first_bf16 = next(i for i, (d, _) in enumerate(calls) if d == torch.bfloat16)
    assert all(d == torch.bfloat16 for d, _ in calls[first_bf16:])
