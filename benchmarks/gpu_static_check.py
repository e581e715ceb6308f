"""GPU kernels checked without a GPU: ahead-of-time compilation and resource budgets.

    python benchmarks/gpu_static_check.py            # sm_80 and sm_90, Triton and CUDA
    python benchmarks/gpu_static_check.py --only syrk --targets 90 --jobs 1

Compiles every Triton kernel of the package (found by scanning its modules for
``@triton.jit`` functions, not by a hard-coded list) at every configuration the library
can launch on a GPU: each autotuning config it offers for each mode, the default launch
shapes, every mode/dtype variant, the shapes the GPU benchmarks and GPU tests use, and
the extremes of the block sizes its public functions accept. Each is compiled for
NVIDIA sm_80 (A100) and sm_90 (H100/H200) through Triton's own compiler and the ptxas
in the triton wheel, with the kernel signature built by Triton's binder, exactly as a
launch on that GPU would build it. The CUDA sources (csrc/cuda/*.cu) are compiled with
``nvcc -Xptxas -v`` for the same targets. No GPU is needed.

One table: kernel, variant, target, registers, spill bytes, local memory (stack frame),
shared memory, warps/stages, tensor-core instruction count (HMMA/IMMA/HGMMA/IGMMA in the
SASS), who launches it. Exit status 1 on:
  * a compile error (any variant);
  * spills or local memory in a configuration launched by default, offered to
    autotuning, or used by a benchmark;
  * shared memory above the target's per-block limit (any variant: it could not launch);
  * a tensor-core kernel whose SASS has no tensor-core instruction.
The table goes to benchmarks/results/gpu-static.md (``--out``). Nothing is cached across
runs (a fresh Triton cache directory, removed at exit). Cost: about 1-1.5 s of one core
per Triton variant (~210 of them) plus ~5 s per nvcc compile: 2-3 minutes on 2 idle
cores (``--jobs`` processes, default min(4, cores)); ``--only`` and ``--targets`` narrow it. What it cannot see: run time,
numerical results (compiled Triton fuses multiply-adds and uses ex2.approx), anything
that depends on the data; those need a GPU (benchmarks/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import contextlib
import importlib
import io
import itertools
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
PKG_DIR = ROOT / "python" / "analytic_diffusion"
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGETS = (80, 90)
# Largest shared memory one thread block may use (opt-in), bytes: A100 163 KB,
# H100/H200 227 KB; RTX 30/40 and L40S (sm_86, sm_89) 99 KB, which default launches
# compiled for sm_80 must also fit (those GPUs run the same code as sm_80).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TC_OPS = re.compile(r"\b(HMMA|IMMA|HGMMA|IGMMA)\b")
LOCAL_OPS = re.compile(r"\b(LDL|STL)\b")
# who launches a configuration; spills are errors for the first three
STRICT = ("default", "autotune", "benchmark")


# =============================================================================== variants
@dataclass(frozen=True)
class Ptr:
    """A pointer argument: its element dtype (torch name) and whether it is 16-byte aligned."""

    dtype: str
    aligned: bool = True


@dataclass
class Variant:
    kernel: str  # "module:function"
    label: str
    args: tuple  # Ptr / int / float, in the kernel's parameter order (constexprs excluded)
    constexprs: dict
    num_warps: int
    num_stages: int
    launched: set
    tensor_cores: bool
    target: int = 0
    key: str = ""
    labels: list = field(default_factory=list)


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


class _FakePtr:
    """What Triton's binder reads of a tensor: ``dtype`` and ``data_ptr()``."""

    def __init__(self, p: Ptr):
        self.dtype = _torch_dtype(p.dtype)
        self._addr = (1 << 24) + (0 if p.aligned else 1)

    def data_ptr(self):
        return self._addr


def _real_args(args):
    return [(_FakePtr(a) if isinstance(a, Ptr) else a) for a in args]


# ----------------------------------------------------------------------- discovery
def jit_sources() -> Dict[str, List[str]]:
    """Module name -> names of the functions decorated with ``triton.jit`` in its source
    (an AST scan of every .py file of the package)."""
    found: Dict[str, List[str]] = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        text = path.read_text()
        if "jit" not in text:
            continue
        names = []
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in node.decorator_list:
                    d = d.func if isinstance(d, ast.Call) else d
                    if (isinstance(d, ast.Attribute) and d.attr == "jit") or (isinstance(d, ast.Name) and d.id == "jit"):
                        names.append(node.name)
        if names:
            mod = ".".join(("analytic_diffusion",) + path.relative_to(PKG_DIR).with_suffix("").parts)
            found[mod.removesuffix(".__init__")] = names
    return found


def discover() -> Tuple[Dict[str, object], Dict[str, object], Dict[str, List[str]]]:
    """(kernels, autotuners, sources): every ``JITFunction`` of the package by
    "module:name", the ``Autotuner`` wrapping each autotuned one, and the AST scan.
    Kernels built inside cached factory functions (the package creates them lazily so
    that it imports without Triton) are found by calling the module's zero-argument
    functions whose source holds ``@triton.jit``."""
    import inspect

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    kernels: Dict[str, object] = {}
    tuners: Dict[str, object] = {}

    def collect(obj, depth=0):
        if isinstance(obj, JITFunction):
            kernels[f"{obj.module}:{obj.fn.__name__}"] = obj
        elif isinstance(obj, Autotuner):
            base = obj.fn
            tuners[f"{base.module}:{base.fn.__name__}"] = obj
            collect(base)
        elif depth < 2 and isinstance(obj, (tuple, list)):
            for o in obj:
                collect(o, depth + 1)
        elif depth < 2 and hasattr(obj, "__dict__") and type(obj).__name__ == "SimpleNamespace":
            for o in vars(obj).values():
                collect(o, depth + 1)

    sources = jit_sources()
    for modname in sources:
        mod = importlib.import_module(modname)
        for name, obj in list(vars(mod).items()):
            collect(obj)
            fn = getattr(obj, "__wrapped__", obj)
            if inspect.isfunction(fn) and fn.__module__ == modname and name not in sources[modname]:
                try:
                    src = inspect.getsource(fn)
                    params = inspect.signature(obj).parameters
                except (OSError, TypeError, ValueError):
                    continue
                if "@triton.jit" in src and not params:  # a kernel factory
                    collect(obj())
    return kernels, tuners, sources


# ----------------------------------------------------------------------- per kernel
# How the library launches each kernel on a GPU. Values are read from the module that
# defines the kernel (its launch constants), so a changed constant is checked at once;
# a kernel without an entry here fails the check ("no launch variants declared").

U8, I32, I64, F16, F32 = Ptr("uint8"), Ptr("int32"), Ptr("int64"), Ptr("float16"), Ptr("float32")
TRAIN_DTYPES = ("uint8", "float16", "float32", "float64")  # _validate.IMAGE_DTYPES


def v_colsum(kid, mod, tuners, target) -> Iterator[Variant]:
    B, n = 20000, 3072
    contig = (U8, I64, I64, B, n, n, 1, 1024)
    strided = (Ptr("uint8", False), I64, I64, B, 3071, 6143, 2, 1024)  # every other column of a slice
    for label, args in (("contiguous n=3072", contig), ("strided, misaligned", strided)):
        yield Variant(kid, label, args, dict(BLOCK_N=128, BLOCK_R=32), 4, 3, {"default"}, False)


def v_syrk(kid, mod, tuners, target) -> Iterator[Variant]:
    B, n = 20000, 3072

    def args(contig=True):
        if contig:
            return (U8, I64, I64, I32, B, n, n, 1, 65536, -16384 * B)
        return (Ptr("uint8", False), I64, I64, I32, B, n - 1, 2 * n - 1, 2, 65536, -16384 * B)  # every other column

    d = dict(mod._SYRK_GPU_DEFAULT)
    cfgs = [(d, True, {"default"}), (dict(mod._SYRK_GPU_STRIDED), False, {"default"})]
    import bench_moments_gpu  # the launch shapes the GPU benchmark times

    cfgs += [(dict(d, **c), True, {"benchmark"}) for c in bench_moments_gpu.TRITON_CONFIGS if c]
    # the extremes of what u8_syrk_update accepts (it refuses anything else): smallest and
    # largest tiles at the most pipeline stages the staged-bytes bound allows
    lim = mod.SYRK_LIMITS
    for blk, bk in itertools.product((min(lim["block"]), max(lim["block"])), (min(lim["bk"]), max(lim["bk"]))):
        st = min(lim["max_stages"], lim["max_stage_bytes"] // (2 * blk * bk))
        for contig in (True, False):
            cfgs.append((dict(block=blk, bk=bk, num_warps=4 if blk <= 64 else 8, num_stages=st), contig, {"option"}))
    for c, contig, who in cfgs:
        label = f"block={c['block']} bk={c['bk']} {'contiguous' if contig else 'strided'}"
        yield Variant(kid, label, args(contig), dict(BLOCK=c["block"], BK=c["bk"]), c["num_warps"], c["num_stages"], who, True)


def _loc_args(train: Ptr, B=128, n=3072, N=50000, chunk=None, syj=1, ld=48):
    npad = -(-n // 128) * 128
    split = N
    return (F32, F32, train, n * syj, syj, F16, npad, I32, I32, ld, I32, I32, ld,
            F32, F32, F32, F32, B, n, N, split, chunk or split, 0.0052, -0.66, -0.0123, 0.005)


def v_loc(kid, mod, tuners, target) -> Iterator[Variant]:
    """Autotuning: every config offered on this target in every mode for uint8 training
    sets (the main path); for float32 every offered config with state output; float16 and
    float64 (rare) the first offered config. Plus the GPU tests' fixed shapes and strided,
    misaligned odd-sized inputs."""
    tuner = tuners.get(kid)
    if tuner is None:
        raise RuntimeError(f"{kid}: no Autotuner wraps it (is ANALYTIC_DIFFUSION_TRITON_AUTOTUNE=0 set?)")
    bj, bms = mod._LOC_GPU_BJ, tuple(mod._LOC_GPU_BMS)

    def cfg_key(c):
        return (c.kwargs["BB"], c.kwargs["BK"], c.kwargs["BM"], c.num_warps, c.num_stages)

    def offered(wssm, split):
        keep = mod._loc_gpu_configs(target // 10, wssm, split)
        return [c for c in tuner.configs if cfg_key(c) in keep]

    for wssm, split, state, ydt in itertools.product((False, True), (False, True), (False, True), TRAIN_DTYPES):
        if ydt != "uint8" and not state:
            continue
        flags = dict(WSSM=wssm, STATE=state, SPLIT=split, IS_U8=ydt == "uint8", BJ=bj, BM_A=bms[0])
        mode = ("wssm" if wssm else "exact") + ("+state" if state else "") + ("+hi/lo" if split else "")
        configs = offered(wssm, split)
        for i, cfg in enumerate(configs):
            if ydt in ("float16", "float64") and i:
                continue
            kw = cfg.kwargs
            yield Variant(kid, f"{mode} {ydt} BB={kw['BB']} BK={kw['BK']} BM={kw['BM']}", _loc_args(Ptr(ydt), chunk=256 if wssm else None),
                          dict(flags, **kw), cfg.num_warps, cfg.num_stages, {"autotune", "default"} if i == 0 else {"autotune"}, True)
        # strided, misaligned training set, n not a multiple of 16, few queries
        kw = configs[0].kwargs
        if ydt == "uint8" and state:
            args = _loc_args(Ptr("uint8", False), B=5, n=3071, N=1001, chunk=37 if wssm else None, syj=2, ld=7)
            yield Variant(kid, f"{mode} uint8 strided n=3071 BB={kw['BB']} BK={kw['BK']} BM={kw['BM']}", args, dict(flags, **kw),
                          configs[0].num_warps, configs[0].num_stages, {"autotune", "default"}, True)
    # fixed launch shapes (blocks=...): the GPU tests'; unset sizes come from the first config
    first = mod._LOC_GPU_CONFIGS[0]
    for bb, bk, bm in ((8, 16, 64), (4, 16, 64), (4, 16, 128)):
        for split in (False, True):
            flags = dict(WSSM=False, STATE=False, SPLIT=split, IS_U8=True, BJ=bj, BM_A=bm, BB=bb, BK=bk, BM=bm)
            yield Variant(kid, f"exact{'+hi/lo' if split else ''} uint8 blocks=BB{bb}/BK{bk}/BM{bm}", _loc_args(U8), flags,
                          first[3], first[4], {"test"}, True)


def v_dist(kid, mod, tuners, target) -> Iterator[Variant]:
    o = mod._OPT_GPU
    for has_w, ydt in itertools.product((False, True), TRAIN_DTYPES):
        if ydt in ("float16", "float64") and not has_w:
            continue
        args = (F32, F32, Ptr(ydt), 3072, 1, F32, 4194304 // 128, 128, 3072, 0, 32768, 0.0052, -0.66, -0.0123)
        yield Variant(kid, f"{'window' if has_w else 'optimal'} {ydt}", args,
                      dict(HAS_W=has_w, BB=o["BB"], BK=o["BK"], BJ=o["BJ"]), o["dist_warps"], 3, {"default"}, False)
    args = (F32, F32, Ptr("uint8", False), 6141, 2, F32, 1001, 5, 3071, 0, 1001, 0.0052, -0.66, -0.0123)
    yield Variant(kid, "window uint8 strided n=3071", args, dict(HAS_W=True, BB=o["BB"], BK=o["BK"], BJ=o["BJ"]),
                  o["dist_warps"], 3, {"default"}, False)


def v_wsum(kid, mod, tuners, target) -> Iterator[Variant]:
    o = mod._OPT_GPU
    for wssm, state, ydt in itertools.product((False, True), (False, True), TRAIN_DTYPES):
        if ydt in ("float16", "float64") and not state:
            continue
        args = (F32, 32768, Ptr(ydt), 3072, 1, F32, F32, F32, F32, 128, 3072, 0, 32768, 32768, 256 if wssm else 32768, 0.005)
        mode = ("wssm" if wssm else "exact") + ("+state" if state else "")
        yield Variant(kid, f"{mode} {ydt}", args, dict(WSSM=wssm, STATE=state, IS_U8=ydt == "uint8", BB=o["BB"], BK=o["BK"], BN=o["BN"]),
                      o["wsum_warps"], 3, {"default"}, False)
    args = (F32, 1001, Ptr("uint8", False), 6141, 2, F32, F32, F32, F32, 5, 3071, 0, 1001, 352, 37, 0.005)
    yield Variant(kid, "wssm+state uint8 strided n=3071", args, dict(WSSM=True, STATE=True, IS_U8=True, BB=o["BB"], BK=o["BK"], BN=o["BN"]),
                  o["wsum_warps"], 3, {"default"}, False)


def v_wloc(kid, mod, tuners, target) -> Iterator[Variant]:
    """windowed_locality_denoise: one launch shape per padded image width (no autotuning);
    every mode for uint8 training sets, WSSM with and without state for float32, and the
    rarer float16/float64 with state output; C = 3 channels, H = W = the width class."""
    for twp, bb, bk, th, warps, stages, maxnreg in mod._WLOC_GPU_CONFIGS:
        C, H, W, N = 3, twp, twp, 50000
        n_th = -(-H // th)
        for wssm, state, ydt in itertools.product((False, True), (False, True), TRAIN_DTYPES):
            if ydt != "uint8" and not state:
                continue
            if ydt in ("float16", "float64") and wssm:
                continue
            args = (F32, F32, Ptr(ydt), C * H * W, H * W, W, 1, I32, I64, I32, I32, I32, I32, 2 * 16 + 1, I32, F32,
                    F32, F32, F32, F32, 128, C, H, W, N, n_th, N, 256 if wssm else N, 0.0052, -0.66, -0.0123, 0.005)
            mode = ("wssm" if wssm else "exact") + ("+state" if state else "")
            yield Variant(kid, f"{mode} {ydt} {C}x{H}x{W}", args,
                          dict(WSSM=wssm, STATE=state, IS_U8=ydt == "uint8", BB=bb, BK=bk, TH=th, TWP=twp, maxnreg=maxnreg),
                          warps, stages, {"default"}, False)


def v_els(kid, mod, tuners, target) -> Iterator[Variant]:
    """els_denoise: the one GPU launch shape (ELS_GPU_CONFIG) in every mode: circular and
    zero padding, state output or not, every training dtype (uint8 and float32 in every
    mode, float16/float64 with state output); 32x32x3 CIFAR-like images, N = 50000, P = 5,
    and a strided, misaligned uint8 training set of odd size (31 x 29, P = 9)."""
    bq, bc, kb, warps, stages = mod.ELS_GPU_CONFIG
    flags = dict(BQ=bq, BC=bc, KB=kb, CP=16)
    for circular, state, ydt in itertools.product((True, False), (False, True), TRAIN_DTYPES):
        if ydt in ("float16", "float64") and not state:
            continue
        C, H, W, N = 3, 32, 32, 50000
        args = (F32, Ptr(ydt), C * H * W, H * W, W, 1, I32, F32, F32, F32, F32, 128, C, H, W, N, 5, N, 0.0052, -0.66, -0.0123)
        mode = ("circular" if circular else "zeros") + ("+state" if state else "")
        yield Variant(kid, f"{mode} {ydt} {C}x{H}x{W} P=5", args, dict(flags, CIRCULAR=circular, STATE=state, IS_U8=ydt == "uint8"),
                      warps, stages, {"default"}, False)
    C, H, W, N = 3, 31, 29, 1001
    args = (F32, Ptr("uint8", False), 2 * C * H * W, 1, 2 * C * W, 2 * C, I32, F32, F32, F32, F32, 5, C, H, W, N, 9, 334, 0.0052, -0.66, -0.0123)
    yield Variant(kid, "zeros+state uint8 strided 3x31x29 P=9", args, dict(flags, CIRCULAR=False, STATE=True, IS_U8=True),
                  warps, stages, {"default"}, False)


def v_lagprod(kid, mod, tuners, target) -> Iterator[Variant]:
    """patch_moments: the GPU launch shape (PATCH_GPU_CONFIG, pixels per program by channel
    count) for every input dtype, C = 1 and 3, per-pixel products (patch_sums) and
    whole-image sums (REDUCE, lag_sums); 64x64 images, k = 15, a batch of 256; plus a
    channels-last, misaligned uint8 batch of odd size."""
    bb, _, warps = mod.PATCH_GPU_CONFIG
    B, H, W = 256, 64, 64
    for C, reduce, xdt in itertools.product((1, 3), (False, True), TRAIN_DTYPES):
        u8 = xdt == "uint8"
        out = Ptr("int64") if u8 else Ptr("float64")
        bp = mod.gpu_pixels(C)
        nblk = -(-H * W // bp)
        args = (Ptr(xdt), C * H * W, H * W, W, 1, Ptr("float64"), out, B, C, H, W, 0, 14, nblk)
        cp = 1 if C == 1 else 4
        yield Variant(kid, f"{'lag sums' if reduce else 'patch'} {xdt} C={C} {H}x{W}", args,
                      dict(IS_U8=u8, REDUCE=reduce, BB=bb, BP=bp, CP=cp, BLOCK_IMAGES=16384 // bb * bb), warps, 1, {"default"}, False)
    C, H, W = 3, 63, 61
    bp = mod.gpu_pixels(C)
    args = (Ptr("uint8", False), C * H * W, 1, W * C, C, Ptr("float64"), Ptr("int64"), 1001, C, H, W, 3, 7, -(-H * W // bp))
    yield Variant(kid, "patch uint8 channels-last misaligned 3x63x61", args,
                  dict(IS_U8=True, REDUCE=False, BB=bb, BP=bp, CP=4, BLOCK_IMAGES=16384 // bb * bb), warps, 1, {"default"}, False)


def v_lagprod_mma(kid, mod, tuners, target) -> Iterator[Variant]:
    """patch_moments, uint8 on int8 tensor cores: the launch shape the library picks
    (``_mma_blocks``: 64-row tiles, or 32-row tiles for narrow rows) at the shapes where
    ``use_mma`` sends uint8 batches to it: 64x64, k = 15, C = 1 and 3, a batch of 256;
    32x32, C = 1, k = 9 (32-row tiles); and a channels-last, misaligned batch of odd size
    (3 x 63 x 61, 1001 images, row lags from 3)."""
    import torch

    cuda = torch.device("cuda")  # a device object only: nothing runs

    def variant(label, shape, Lj, di0, strides, aligned=True):
        B, C, H, W = shape
        assert mod.use_mma(shape, cuda, True, Lj), f"{label}: the library would not use the tensor-core kernel here"
        blk = mod._mma_blocks(cuda, shape, Lj)
        BW, nt, n_half = mod.mma_tiling(C, W, Lj, blk["BM"])
        args = (Ptr("int8", aligned), *strides, I64, I64, B, C, H, W, di0, Lj, n_half, -16384 * B)
        cx = dict(BW=BW, BM=blk["BM"], BK=blk["BK"])
        return Variant(kid, f"{label} BM={blk['BM']} BK={blk['BK']}", args, cx, blk["num_warps"], blk["num_stages"], {"default"}, True)

    for C in (1, 3):
        yield variant(f"patch uint8 C={C} 64x64 k=15", (256, C, 64, 64), 14, 0, (C * 4096, 4096, 64, 1))
    yield variant("patch uint8 C=1 32x32 k=9", (256, 1, 32, 32), 4, 0, (1024, 1024, 32, 1))
    C, H, W = 3, 63, 61
    yield variant("patch uint8 channels-last misaligned 3x63x61 k=15", (1001, C, H, W), 14, 3, (C * H * W, 1, W * C, C), aligned=False)


SPECS = {"els_kernel": v_els, "lagprod_kernel": v_lagprod, "lagprod_mma_kernel": v_lagprod_mma, "wloc_kernel": v_wloc, "colsum_kernel": v_colsum, "syrk_kernel": v_syrk, "loc_kernel": v_loc, "dist_kernel": v_dist, "wsum_kernel": v_wsum}


def triton_variants(targets, only: Optional[str]) -> Tuple[List[Variant], List[str]]:
    """Every variant for every target, deduplicated by the binder's specialization key."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernels, tuners, sources = discover()
    errors = []
    for mod, names in sources.items():
        for nm in names:
            if f"{mod}:{nm}" not in kernels:
                errors.append(f"{mod}:{nm}: decorated with triton.jit but not found at run time")
    out: Dict[str, Variant] = {}
    for kid, kern in sorted(kernels.items()):
        name = kid.split(":")[1]
        if only and not re.search(only, kid):
            continue
        spec = SPECS.get(name)
        if spec is None:
            errors.append(f"{kid}: no launch variants declared in benchmarks/gpu_static_check.py (SPECS)")
            continue
        mod = sys.modules[kern.module]
        for target in targets:
            backend = make_backend(GPUTarget("cuda", target, 32))
            binder = create_function_from_signature(kern.signature, kern.params, backend)
            for v in spec(kid, mod, tuners, target):
                _, specialization, options = binder(*_real_args(v.args), **v.constexprs, num_warps=v.num_warps, num_stages=v.num_stages)
                key = f"{kid}|{target}|{specialization}|{sorted(options.items())}"
                if key in out:
                    out[key].launched |= v.launched
                    out[key].labels.append(v.label)
                    continue
                v.target, v.key, v.labels = target, key, [v.label]
                out[key] = v
    return list(out.values()), errors


# =============================================================================== compile
_KERNELS = None


def _worker_init():
    global _KERNELS
    import triton  # noqa: F401

    _KERNELS = discover()[0]


def _cuobjdump() -> Optional[str]:
    path = shutil.which("cuobjdump")
    if path:
        return path
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "cuobjdump").exists():
            return str(Path(home, "bin", "cuobjdump"))
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001
        return None


def _ptxas_figures(log: str) -> dict:
    def grab(pat):
        m = re.findall(pat, log)
        return max(int(x) for x in m) if m else 0

    return dict(regs=grab(r"Used (\d+) registers"), spill=grab(r"(\d+) bytes spill stores"), stack=grab(r"(\d+) bytes stack frame"))


def _sass_counts(cubin: bytes) -> Tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return len(TC_OPS.findall(sass)), len(LOCAL_OPS.findall(sass))


def compile_triton(v: Variant) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kern = _KERNELS[v.kernel]
    target = GPUTarget("cuda", v.target, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kern.signature, kern.params, backend)
    kw = dict(v.constexprs, num_warps=v.num_warps, num_stages=v.num_stages)
    t0 = time.perf_counter()
    try:
        bound, specialization, options = binder(*_real_args(v.args), **kw)
        opts, sig, constexprs, attrs = kern._pack_args(backend, kw, bound, specialization, options)
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by Triton
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(kern, sig, constexprs, attrs), target=target, options=opts.__dict__)
        fig = _ptxas_figures(buf.getvalue())
        tc, local = _sass_counts(ck.asm["cubin"])
        return dict(fig, smem=int(ck.metadata.shared), tc=tc, local_ops=local, seconds=time.perf_counter() - t0, error=None)
    except Exception as e:  # noqa: BLE001 - a compile error is a result
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        return dict(error=msg[:400], seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------- CUDA sources
def cuda_jobs(targets) -> List[Tuple[str, int]]:
    return [(str(p.relative_to(ROOT)), t) for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) for t in targets]


def _demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def compile_cuda(job: Tuple[str, int]) -> List[dict]:
    """nvcc -cubin -Xptxas -v of one source for one target: one row per kernel."""
    src, target = job
    t0 = time.perf_counter()
    try:
        import pybind11  # csrc/cuda/module.cu includes its headers (the test extra installs it)
    except ImportError:
        return [dict(kernel=src, variant="(whole file)", target=target, seconds=0.0, launched="default", tensor_cores=False,
                     error="pybind11 is not importable: pip install pybind11 (its headers are needed to compile the CUDA sources)")]
    inc = [f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d, "k.cubin")
        cmd = ["nvcc", "-cubin", "-O3", "-std=c++17", "-DNDEBUG", f"-arch=sm_{target}", "-Xptxas", "-v", *inc, "-o", str(cubin), str(ROOT / src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            return [dict(kernel=src, variant="(whole file)", target=target, error=" ".join(r.stderr.split())[-400:], seconds=secs,
                         launched="default", tensor_cores=False)]
        sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    # ptxas -v: "Compiling entry function 'NAME' for 'sm_XX'" then its properties
    rows = []
    blocks = re.split(r"Compiling entry function '([^']+)'", r.stderr)
    names = blocks[1::2]
    dem = _demangle(names)
    sass_by_fn = {m.group(1): m.group(2) for m in re.finditer(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S)}
    for name, body in zip(names, blocks[2::2]):
        fig = _ptxas_figures(body)
        smem = re.search(r"(\d+) bytes smem", body)
        code = sass_by_fn.get(name, "")
        pretty = dem[name].replace("analytic_diffusion::", "").replace("(anonymous namespace)::", "").replace("u8syrk::", "")
        pretty = re.sub(r"^void ", "", re.sub(r"\(.*\)$", "", pretty))  # drop the return type and parameters
        rows.append(dict(kernel=f"{src}:{pretty}", variant="", target=target, **fig, smem=int(smem.group(1)) if smem else 0,
                         tc=len(TC_OPS.findall(code)), local_ops=len(LOCAL_OPS.findall(code)), warps="128 thr" if "mma" in pretty else "",
                         launched="default", tensor_cores="mma" in pretty, seconds=secs / max(1, len(names)), error=None))
    return rows


# =============================================================================== report
def judge(row: dict) -> List[str]:
    """The reasons a row fails the check (empty: passes)."""
    if row.get("error"):
        return ["compile error"]
    bad = []
    strict = any(w in row["launched"] for w in STRICT)
    if strict and (row["spill"] or row["stack"] or row["local_ops"]):
        bad.append(f"spills {row['spill']} B / stack {row['stack']} B in a {row['launched']} configuration")
    limit = SMEM_LIMIT[row["target"]]
    if row["smem"] > limit:
        bad.append(f"shared memory {row['smem']} B > {limit} B (sm_{row['target']} per-block limit)")
    elif row["target"] == 80 and "default" in row["launched"] and row["smem"] > SMEM_LIMIT[86]:
        bad.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[86]} B (sm_86/sm_89 per-block limit) in a default launch")
    if row["tensor_cores"] and row["tc"] == 0:
        bad.append("tensor-core kernel without tensor-core instructions")
    return bad


def table(rows: List[dict]) -> str:
    lines = [
        "| kernel | variant | target | regs | spill B | stack B | smem B | warps/stages | TC instr | launched by | status |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for r in rows:
        st = "; ".join(r["bad"]) or ("ok" if not r.get("error") else "")
        if r.get("error"):
            lines.append(f"| {r['kernel']} | {r['variant']} | sm_{r['target']} | | | | | {r.get('warps', '')} | | {r['launched']} | ERROR: {r['error']} |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['variant']} | sm_{r['target']} | {r['regs']} | {r['spill']} | {r['stack']} | {r['smem']} | "
            f"{r.get('warps', '')} | {r['tc']} | {r['launched']} | {st} |"
        )
    return "\n".join(lines)


def summary(rows: List[dict]) -> str:
    """Per kernel and target: worst figures over its variants (and over the strict ones)."""
    by: Dict[Tuple[str, int], List[dict]] = {}
    for r in rows:
        if not r.get("error"):
            by.setdefault((r["kernel"], r["target"]), []).append(r)
    lines = ["| kernel | target | variants | regs (max) | spill B (max, strict / all) | smem B (max) | TC instr (min..max) |",
             "|---|---|---:|---:|---|---:|---|"]
    for (k, t), rs in sorted(by.items()):
        strict = [r for r in rs if any(w in r["launched"] for w in STRICT)] or [dict(spill=0)]
        tcs = [r["tc"] for r in rs]
        lines.append(f"| {k} | sm_{t} | {len(rs)} | {max(r['regs'] for r in rs)} | {max(r['spill'] for r in strict)} / {max(r['spill'] for r in rs)} | "
                     f"{max(r['smem'] for r in rs)} | {min(tcs)}..{max(tcs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), help="compute capabilities (default: 80 90)")
    p.add_argument("--only", help="regular expression on kernel names (module:function or file:function)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="compile processes")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-static.md"), help="markdown table ('' to skip)")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    args = p.parse_args(argv)
    for t in args.targets:
        if t not in SMEM_LIMIT:
            p.error(f"unknown target {t}; known: {sorted(SMEM_LIMIT)}")

    t_start = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="ad-static-triton-")
    os.environ["TRITON_CACHE_DIR"] = cache  # nothing reused across runs (workers inherit it)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
    os.environ.pop("ANALYTIC_DIFFUSION_TRITON_AUTOTUNE", None)  # the full autotuning list
    problems: List[str] = []
    rows: List[dict] = []
    try:
        variants: List[Variant] = []
        if not args.no_triton:
            try:
                import triton

                variants, errs = triton_variants(args.targets, args.only)
                problems += errs
                print(f"triton {triton.__version__}: {len(variants)} kernel variants to compile", flush=True)
            except ImportError as e:
                problems.append(f"triton is not importable ({e}); --no-triton skips the Triton kernels")
        cjobs = []
        if not args.no_cuda:
            if shutil.which("nvcc") is None:
                print("WARNING: nvcc not found: the CUDA sources are not checked (--no-cuda silences this)", flush=True)
            else:
                cjobs = [j for j in cuda_jobs(args.targets) if not args.only or re.search(args.only, j[0])]
        if (variants or cjobs) and _cuobjdump() is None:
            problems.append("cuobjdump not found (PATH, CUDA_HOME/bin or the triton wheel)")
            variants, cjobs = [], []
        if args.list:
            for v in variants:
                print(f"{v.kernel} sm_{v.target} {' | '.join(v.labels)} warps={v.num_warps} stages={v.num_stages} {sorted(v.launched)}")
            print(f"{len(variants)} Triton variants, {len(cjobs)} CUDA compiles")
            return 0
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_worker_init) as pool:
            cfut = [pool.submit(compile_cuda, j) for j in cjobs]  # the long nvcc runs first
            tfut = [pool.submit(compile_triton, v) for v in variants]
            done = 0
            for v, fut in zip(variants, tfut):
                res = fut.result()
                done += 1
                if done % 50 == 0:
                    print(f"  {done}/{len(variants)} compiled ({time.perf_counter() - t_start:.0f} s)", flush=True)
                rows.append(dict(kernel=v.kernel.replace("analytic_diffusion.", ""), variant=" = ".join(v.labels), target=v.target,
                                 warps=f"{v.num_warps}/{v.num_stages}", launched=",".join(sorted(v.launched)),
                                 tensor_cores=v.tensor_cores, **res))
            for fut in cfut:
                rows.extend(fut.result())
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    rows.sort(key=lambda r: (r["kernel"], r["target"], r["variant"]))
    for r in rows:
        r["bad"] = judge(r)
    failed = [r for r in rows if r["bad"]]
    elapsed = time.perf_counter() - t_start
    tab = table(rows)
    summ = summary(rows)
    print(summ)
    print()
    for r in failed:
        print(f"FAIL {r['kernel']} [{r['variant']}] sm_{r['target']}: {'; '.join(r['bad'])}")
    for msg in problems:
        print(f"FAIL {msg}")
    n_tc = sum(1 for r in rows if r.get("tc"))
    print(f"{len(rows)} compiled variants ({n_tc} with tensor-core instructions), {len(failed)} failing, "
          f"{len(problems)} other problems, {elapsed:.0f} s with {args.jobs} processes")
    if args.out:
        import triton

        head = (
            "# GPU kernels compiled without a GPU (static resource check)\n\n"
            f"Written by `python benchmarks/gpu_static_check.py` (`.ci/run` runs it): triton {triton.__version__}, "
            f"{subprocess.run(['nvcc', '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1] if shutil.which('nvcc') else 'no nvcc'}. "
            "Registers, spill stores, stack frame (local memory) from `ptxas -v`; shared memory is Triton's dynamic "
            "allocation (static `smem` for CUDA); TC instr counts HMMA/IMMA/HGMMA/IGMMA in the SASS (`cuobjdump -sass`). "
            "'launched by': default = a default launch of the library, autotune = offered to Triton's autotuner, "
            "benchmark = benchmarks/bench_*_gpu.py, test = the GPU tests' fixed shapes, option = the extremes of the block "
            "sizes a public function accepts. Spills fail the check for default/autotune/benchmark launches; shared "
            "memory above the per-block limit (sm_80 163 KB, sm_90 227 KB, and 99 KB for default launches, for sm_86/89) "
            "and tensor-core kernels without tensor-core instructions fail it anywhere. Compiled, never run: "
            "timings and numerics need a GPU (benchmarks/gpu_check.sh).\n\n"
            f"{len(rows)} variants, {len(failed)} failing.\n\n## Per kernel (worst case over its variants)\n\n"
        )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(head + summ + "\n\n## Every variant\n\n" + tab + "\n")
        print(f"table written to {out}")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
