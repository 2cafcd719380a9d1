"""--dtype auto: bf16 only where the device multiplies bf16 natively."""

from __future__ import annotations

import pytest
import torch

from ecoflap_fast import precision


def _fake_cpu(monkeypatch, flags, onednn):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)


@pytest.mark.parametrize(
    "flags, onednn, want",
    [
        ({"avx2", "fma"}, False, "float32"),
        ({"avx2", "avx512f", "avx512_bf16"}, True, "bfloat16"),
        ({"amx_bf16", "amx_tile"}, True, "bfloat16"),
        ({"avx512_bf16"}, False, "float32"),  # the flag without oneDNN's bf16 kernels is not enough
    ],
)
def test_auto_follows_the_cpu(monkeypatch, flags, onednn, want):
    _fake_cpu(monkeypatch, flags, onednn)
    name, why = precision.resolve("auto", "cpu")
    assert name == want and why.startswith("auto: ")


def test_explicit_dtype_is_kept(monkeypatch):
    _fake_cpu(monkeypatch, {"avx512_bf16"}, True)
    assert precision.resolve("float32", "cpu") == ("float32", "asked for")


def test_this_cpu_reads_its_own_flags():
    ok, evidence = precision.native_bf16("cpu")
    flags = precision._cpu_flags()
    assert ok == bool(flags & {"avx512_bf16", "amx_bf16"} and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert "CPU" in evidence


def test_cli_records_the_decision(monkeypatch):
    from ecoflap_fast.cli import _parse

    _fake_cpu(monkeypatch, {"avx2"}, False)
    a = _parse(["prune", "--model", "default", "--output", "x", "--device", "cpu"])
    assert a.dtype == "float32" and "without bf16" in a.dtype_reason
    _fake_cpu(monkeypatch, {"avx512_bf16"}, True)
    a = _parse(["eval", "--model", "default", "--device", "cpu"])
    assert a.dtype == "bfloat16"
    a = _parse(["eval", "--model", "default", "--device", "cpu", "--dtype", "fp32"])
    assert a.dtype == "fp32" and not hasattr(a, "dtype_reason")
