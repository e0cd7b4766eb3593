import pytest
import torch

from opdkit.models import cpu_has_native_bf16, resolve_dtype


def _cpuinfo(tmp_path, flags):
    f = tmp_path / "cpuinfo"
    f.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return f


@pytest.mark.parametrize("flags,expected", [
    ("avx512f avx512bw", False),        # AVX-512 without BF16: oneDNN emulates bf16 (slow)
    ("avx512f avx512_bf16", True),      # e.g. AMD Zen 4, Cooper Lake
    ("amx_tile amx_bf16 amx_int8", True),  # Sapphire Rapids
    ("", False),
])
def test_native_bf16_from_cpuinfo_flags(tmp_path, flags, expected):
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, flags)) is expected


def test_native_bf16_unknown_cpu_is_false(tmp_path):
    assert cpu_has_native_bf16(tmp_path / "missing") is False
    (tmp_path / "noflags").write_text("processor : 0\n")
    assert cpu_has_native_bf16(tmp_path / "noflags") is False


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("opdkit.models.cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr("opdkit.models.cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto") is torch.float32
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        resolve_dtype("fp16")
