"""The native build: both extensions load lazily, describe themselves, and compute."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from analytic_diffusion import _ext


def _ref(u: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The docs/algorithms.md §1.1 mapping, evaluated in float64 then rounded once to the output dtype.
    return ((u.double() - 127.5) / 127.5).to(dtype)


def _assert_exact(out: torch.Tensor, u: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert out.shape == u.shape
    assert out.is_contiguous()
    assert out.device == u.device
    assert not torch.isnan(out).any()
    ref = _ref(u.cpu(), dtype)
    # Bit-exact: the kernels are written to round exactly like the reference.
    assert torch.equal(out.cpu(), ref), (out.cpu() - ref).abs().max()


@pytest.fixture(scope="module")
def cpu_mod():
    mod = _ext.cpu_module()
    if mod is None:
        pytest.fail(f"_C failed to load: {_ext.build_info()['cpu']['error']}")
    return mod


# ----------------------------------------------------------------------- build_info


def test_cpu_build_info_keys(cpu_mod):
    info = _ext.build_info()["cpu"]
    assert info["available"] is True and info["loaded"] is True and info["built"] is True
    assert info["compiler_id"] in {"GNU", "Clang", "AppleClang", "MSVC", "IntelLLVM"}
    assert info["compiler_version"][0].isdigit()
    assert isinstance(info["flags"], str)
    assert isinstance(info["target_flags"], str)
    assert info["build_type"] in {"Release", "RelWithDebInfo", "Debug", "MinSizeRel"}
    assert info["simd"] in {"avx512f", "avx2", "sse4.2", "neon", "none"}
    assert isinstance(info["native"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["max_threads"], int) and info["max_threads"] >= 1
    if info["native"]:
        assert "-march=native" in info["target_flags"]
    if info["openmp"]:
        assert info["openmp_version"] >= 201307  # OpenMP 4.0: `omp simd`
    # The module's own dict is the source; _ext only adds availability and path.
    raw = cpu_mod.build_info()
    assert {k: info[k] for k in raw} == dict(raw)
    assert info["path"].endswith((".so", ".pyd"))


def test_build_info_is_json_serialisable():
    # Benchmarks store it verbatim next to their numbers.
    json.dumps(_ext.build_info())


def test_cuda_module_imports_or_reports_why():
    mod = _ext.cuda_module()  # must not raise whatever the host has
    info = _ext.build_info()["cuda"]
    if mod is None:
        assert info["available"] is False
        assert isinstance(info["error"], str) and info["error"]
        return
    assert info["loaded"] is True and info["built"] is True
    assert info["cuda_version"].count(".") == 1
    assert info["architectures"]
    assert isinstance(info["device_count"], int) and info["device_count"] >= 0
    # available means usable: the module loaded and a device is present
    assert info["available"] is (info["device_count"] > 0)
    if info["device_count"] == 0:
        assert info["device_error"] or not torch.cuda.is_available()
        assert "no CUDA device" in info["error"]


def test_cuda_available_needs_a_device(monkeypatch):
    """Review: build_info()["cuda"]["available"] was True on a host without a GPU (the
    statically linked module loads anywhere)."""
    fake = type("FakeCuda", (), {"build_info": staticmethod(lambda: {"device_count": 0, "device_error": "cudaErrorNoDevice: no CUDA-capable device is detected"}), "__file__": "x.so"})
    monkeypatch.setattr(_ext, "_cache", {_ext._CUDA_NAME: (fake, None)})
    info = _ext.build_info()["cuda"]
    assert info["available"] is False
    assert info["loaded"] is True and info["built"] is True
    assert "cudaErrorNoDevice" in info["error"]
    fake.build_info = staticmethod(lambda: {"device_count": 2, "device_error": None})
    info = _ext.build_info()["cuda"]
    assert info["available"] is True and "error" not in info


# The default CUDA build: machine code for sm_80 (A100), sm_86 (RTX 30), sm_89 (RTX 40,
# L40S), sm_90 (H100/H200), and compute_90 PTX for newer GPUs (CMakeLists.txt).
DEFAULT_SASS = {80, 86, 89, 90}


def _cuobjdump():
    path = shutil.which("cuobjdump")
    if path is None:
        try:
            from triton import knobs  # the triton wheel ships one

            path = knobs.nvidia.cuobjdump.path
        except Exception:
            return None
    return path


def test_cuda_module_default_architectures():
    mod = _ext.cuda_module()
    if mod is None:
        pytest.skip("_C_cuda not built")
    info = _ext.build_info()["cuda"]
    archs = info["architectures"].split(",")
    assert archs and all(a for a in archs)
    if not info.get("architectures_default"):
        pytest.skip(f"built for CMAKE_CUDA_ARCHITECTURES={info['architectures']} (overridden)")
    assert archs == ["80-real", "86-real", "89-real", "90-real", "90-virtual"]
    assert set(info["compiled_architectures"]) == DEFAULT_SASS
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump to read the module's fat binary")
    elf = subprocess.run([cuobjdump, "--list-elf", info["path"]], capture_output=True, text=True)
    ptx = subprocess.run([cuobjdump, "--list-ptx", info["path"]], capture_output=True, text=True)
    assert elf.returncode == 0, elf.stderr
    sass = {int(a) for a in re.findall(r"\.sm_(\d+)\.cubin", elf.stdout)}
    assert sass == DEFAULT_SASS, elf.stdout
    assert {int(a) for a in re.findall(r"\.sm_(\d+)\.ptx", ptx.stdout)} == {90}, ptx.stdout


def test_cuda_module_without_gpu_raises_runtime_error():
    mod = _ext.cuda_module()
    if mod is None:
        pytest.skip("_C_cuda not built")
    if mod.build_info()["device_count"] > 0:
        pytest.skip("a GPU is present")
    src = torch.zeros(2, 3, dtype=torch.uint8)
    dst = torch.empty(2, 3)
    with pytest.raises(RuntimeError, match="CUDA"):
        mod.dequantize_u8(src.data_ptr(), dst.data_ptr(), 2, 3, 3, 1, False, 0)


def test_loaders_are_cached():
    assert _ext.cpu_module() is _ext.cpu_module()
    assert _ext.cuda_module() is _ext.cuda_module()


def test_ext_import_is_lazy():
    code = (
        "import sys, analytic_diffusion._ext as e; "
        "assert 'analytic_diffusion._C' not in sys.modules, 'eager _C'; "
        "assert 'analytic_diffusion._C_cuda' not in sys.modules, 'eager _C_cuda'; "
        "e.cpu_module(); "
        "assert ('analytic_diffusion._C' in sys.modules) == (e.cpu_module() is not None); "
        "assert 'analytic_diffusion._C_cuda' not in sys.modules; "
        "print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_missing_module_reported_not_raised(monkeypatch):
    monkeypatch.setattr(_ext, "_cache", {})
    monkeypatch.setattr(_ext, "_CPU_NAME", "analytic_diffusion._does_not_exist")
    assert _ext.cpu_module() is None
    info = _ext.build_info()["cpu"]
    assert info["available"] is False and info["loaded"] is False and info["built"] is False
    assert "_does_not_exist" in info["error"]
    with pytest.raises(RuntimeError, match="_does_not_exist"):
        _ext.dequantize_u8(torch.zeros(2, 2, dtype=torch.uint8))


# ----------------------------------------------------------------------- dequantize_u8


def _cases(device: str):
    g = torch.Generator().manual_seed(0)
    full = torch.randint(0, 256, (7, 13), dtype=torch.uint8, generator=g)
    big = torch.randint(0, 256, (300, 517), dtype=torch.uint8, generator=g)
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    cases = {
        "7x13": full,
        "all_values": every,
        "transpose": full.t(),
        "strided_slice": big[1::3, 2::5],
        "row_slice": big[10:20, :],
        "col_slice": big[:, 100:101],
        "expand_rows": full[0:1].expand(5, 13),  # stride0 == 0
        "expand_cols": full[:, 0:1].expand(7, 4),  # stride1 == 0
        "big_parallel": big,  # above the OpenMP threshold
        "big_transpose": big.t(),
        "one": full[:1, :1],
    }
    return {k: v.to(device) for k, v in cases.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(_cases("cpu")))
def test_dequantize_u8_cpu(cpu_mod, case, dtype):
    u = _cases("cpu")[case]
    out = _ext.dequantize_u8(u, dtype)
    _assert_exact(out, u, dtype)


def test_dequantize_u8_range_endpoints(cpu_mod):
    u = torch.tensor([[0, 255, 127, 128]], dtype=torch.uint8)
    out = _ext.dequantize_u8(u, torch.float64)
    assert out[0, 0].item() == -1.0
    assert out[0, 1].item() == 1.0
    assert out[0, 2].item() < 0 < out[0, 3].item()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_dequantize_u8_empty(cpu_mod, shape):
    out = _ext.dequantize_u8(torch.zeros(shape, dtype=torch.uint8))
    assert out.shape == shape and out.dtype == torch.float32


def test_dequantize_u8_rejects_bad_input():
    with pytest.raises(TypeError):
        _ext.dequantize_u8(torch.zeros(2, 2, dtype=torch.float32))
    with pytest.raises(ValueError):
        _ext.dequantize_u8(torch.zeros(2, 2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        _ext.dequantize_u8(torch.zeros(2, 2, dtype=torch.uint8), torch.float16)


def test_raw_cpu_rejects_negative_stride(cpu_mod):
    src = torch.zeros(2, 3, dtype=torch.uint8)
    dst = torch.empty(2, 3)
    with pytest.raises(ValueError):
        cpu_mod.dequantize_u8(src.data_ptr(), dst.data_ptr(), 2, 3, -3, 1, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(_cases("cpu")))
def test_dequantize_u8_cuda(case, dtype):
    if _ext.cuda_module() is None:
        pytest.fail(f"_C_cuda failed to load: {_ext.build_info()['cuda']['error']}")
    u = _cases("cuda")[case]
    out = _ext.dequantize_u8(u, dtype)
    torch.cuda.synchronize()
    _assert_exact(out, u, dtype)
    # Same rounding on both backends.
    if _ext.cpu_module() is not None:
        assert torch.equal(out.cpu(), _ext.dequantize_u8(u.cpu(), dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dequantize_u8_cuda_side_stream():
    u = torch.randint(0, 256, (64, 300), dtype=torch.uint8, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = _ext.dequantize_u8(u.t(), torch.float32)
    s.synchronize()
    _assert_exact(out, u.t(), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_raw_cuda_rejects_host_pointer():
    mod = _ext.cuda_module()
    if mod is None:
        pytest.skip("_C_cuda not built")
    src = torch.zeros(2, 3, dtype=torch.uint8)
    dst = torch.empty(2, 3, device="cuda")
    with pytest.raises(ValueError, match="device-accessible"):
        mod.dequantize_u8(src.data_ptr(), dst.data_ptr(), 2, 3, 3, 1, False, 0)


def test_a_cpu_backend_without_its_kernels_names_itself():
    from analytic_diffusion import _ext

    assert not _ext.cpu_has(("no_such_kernel",))
    with pytest.raises(RuntimeError, match="the CPU nearest backend needs the compiled extension analytic_diffusion._C.*built without the nearest kernels.*backend='reference'"):
        _ext.require_cpu(("no_such_kernel",), "nearest")
