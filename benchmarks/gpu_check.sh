#!/usr/bin/env bash
# One-shot GPU check, for a lent H100/H200 (device tool `run`), within 540 s:
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=560)
#   bash benchmarks/gpu_check.sh --dry-run      # CI: the same Python paths on the CPU
#
# Steps, in priority order, each time-boxed against one overall budget
# (AD_GPU_CHECK_BUDGET, default 530 s; a step that would not fit is skipped and says so):
#   build        pip install --no-build-isolation --no-deps . (_C and _C_cuda for sm_80,
#                sm_86, sm_89, sm_90 + compute_90 PTX), nvcc using every core
#   sass         cuobjdump of the built _C_cuda: machine code per architecture, IMMA count,
#                local-memory instructions (LDL/STL) of the moments kernels
#   tests        the GPU tests: tests/test_moments_gpu.py, tests/test_locality_triton.py, tests/test_els_triton.py,
#                tests/test_patch_moments_triton.py,
#                tests/test_build.py (CUDA and compiled Triton, fixed and autotuned shapes)
#   moments      benchmarks/bench_moments_gpu.py: uint8 SYRK, N = 20000, n = 3072 and 12288,
#                CUDA and Triton launch shapes, vs torch float64 X^T X and torch._int_mm;
#                patch_moments uint8 patch sums (B = 256, 64x64x3 k = 15 ...), tensor-core
#                vs CUDA-core lag products (bit-identical, timed)
#   locality     benchmarks/bench_locality_gpu.py: CIFAR shape (N = 50000, n = 3072,
#                B = 128), the 10 DDIM steps, and optimal_denoise; target 60 ms/step
#   sanitizer    compute-sanitizer memcheck and racecheck on small moments updates
# Everything lands in $OUT (default ./gpu_check_out), eight files at most (the device
# tool brings back 8): summary.txt (read first), build.log, sass.txt.gz, pytest.txt,
# moments.json, locality.json, sanitizer.txt, steps.log (the benchmark scripts' output). The exit status is non-zero if any step failed or was skipped for lack of time.
# No network is needed (the image has torch, triton, scikit-build-core, pybind11).
#
# --dry-run: no build, no GPU. Runs under TRITON_INTERPRET=1 on the CPU with the package
# from this checkout (PYTHONPATH=python, or the installed one if python/ has no compiled
# modules): the test files are collected (their GPU tests skip themselves; the
# interpreter runs the kernels in .ci/run's interpreter step), and both benchmark
# scripts run at tiny shapes through the same code as on the GPU. Budget 300 s.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0
BUDGET="${AD_GPU_CHECK_BUDGET:-$([ $DRY = 1 ] && echo 300 || echo 530)}"
T_END=$((SECONDS + BUDGET))
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME CAP_S LOGFILE CMD...: run with timeout min(CAP, time left)
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((T_END - SECONDS))
    local t=$((cap < left ? cap : left))
    if [ "$t" -lt 15 ]; then
        note "[$name] SKIPPED: ${left} s left of the ${BUDGET} s budget"
        status=1
        return 1
    fi
    local t0=$SECONDS
    timeout "$t" "$@" >>"$log" 2>&1
    local rc=$?
    note "[$name] rc=$rc ($((SECONDS - t0)) s, limit $t s)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
    [ $rc -eq 0 ] || status=1
    return $rc
}

note "== $(date -u +%FT%TZ) $(hostname) $([ $DRY = 1 ] && echo 'DRY RUN (CPU, Triton interpreter)')"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$SUMMARY"
"$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$SUMMARY"

if [ $DRY = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    if ls python/analytic_diffusion/_C*.so >/dev/null 2>&1; then export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"; fi
    # the GPU tests must at least collect (they skip without a GPU; .ci/run's interpreter
    # step runs the kernels)
    step tests 120 "$OUT/pytest.txt" "$PY" -m pytest -q -p no:cacheprovider --collect-only \
        tests/test_moments_gpu.py tests/test_locality_triton.py tests/test_els_triton.py tests/test_patch_moments_triton.py tests/test_build.py
    tail -n 1 "$OUT/pytest.txt" | tee -a "$SUMMARY"
    step moments 120 "$OUT/steps.log" "$PY" benchmarks/bench_moments_gpu.py --dry-run --json "$OUT/moments.json"
    step locality 180 "$OUT/steps.log" "$PY" benchmarks/bench_locality_gpu.py --dry-run --json "$OUT/locality.json"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
    nvcc --version 2>&1 | tail -2 | tee -a "$SUMMARY"
    # ---- build: every core; nvcc compiles the architectures of one file in parallel too
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_FLAGS=--threads=0"
    step build 240 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v .
    "$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import analytic_diffusion as ad
info = ad.build_info()["cuda"]
print("build_info.cuda:", {k: info.get(k) for k in ("available", "architectures", "compiled_architectures", "device_count", "device_error", "error")})
print("moments backends on cuda:", ad.available_backends("moments", "cuda"))
EOF
    # ---- SASS: machine code per architecture, IMMA in the SYRK kernel, no local memory
    SO=$("$PY" -c "import analytic_diffusion._C_cuda as m; print(m.__file__)" 2>/dev/null)
    CUOBJDUMP=$(command -v cuobjdump || "$PY" -c "from triton import knobs; print(knobs.nvidia.cuobjdump.path)" 2>/dev/null)
    if [ -n "$SO" ] && [ -n "$CUOBJDUMP" ]; then
        "$CUOBJDUMP" --list-elf "$SO" 2>&1 | sed 's/^/  /' | tee -a "$SUMMARY"
        "$CUOBJDUMP" -sass "$SO" >"$OUT/sass.txt" 2>&1
        note "[sass] IMMA: $(grep -c 'IMMA' "$OUT/sass.txt")  LDSM: $(grep -c 'LDSM' "$OUT/sass.txt")  local-memory ops (LDL/STL): $(grep -cE '\b(LDL|STL)\b' "$OUT/sass.txt")"
        gzip -f "$OUT/sass.txt"
    else
        note "[sass] _C_cuda not importable or no cuobjdump"; status=1
    fi
    # ---- the GPU tests (the interpreter-only ones are deselected outside TRITON_INTERPRET=1)
    step tests 200 "$OUT/pytest.txt" "$PY" -m pytest -q -ra -p no:cacheprovider \
        tests/test_moments_gpu.py tests/test_locality_triton.py tests/test_els_triton.py tests/test_patch_moments_triton.py tests/test_build.py
    tail -n 3 "$OUT/pytest.txt" | tee -a "$SUMMARY"
    # ---- timings
    step moments 90 "$OUT/steps.log" "$PY" benchmarks/bench_moments_gpu.py --json "$OUT/moments.json"
    step locality 150 "$OUT/steps.log" "$PY" benchmarks/bench_locality_gpu.py --json "$OUT/locality.json"
    # ---- compute-sanitizer on small updates (out-of-bounds, uninitialised, shared-memory races)
    SANITIZE="$(mktemp --suffix=.py)"
    cat >"$SANITIZE" <<'EOF'
import torch
from analytic_diffusion.ops.moments import cuda as _cuda
for B, n, kb in ((37, 33, 0), (300, 200, 64), (130, 257, 0)):
    x = torch.randint(0, 256, (B, n), dtype=torch.uint8, device="cuda")
    s1 = torch.zeros(n, dtype=torch.int64, device="cuda"); s2 = torch.zeros(n, n, dtype=torch.int64, device="cuda")
    _cuda.u8_syrk_update(x, s1, s2, k_block=kb)
    _cuda.u8_syrk_update(x[:, 1:], s1[1:], s2[1:, 1:].contiguous(), k_block=kb)  # byte path
torch.cuda.synchronize()
print("sanitize run done")
EOF
    if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
            step "sanitizer-$tool" 60 "$OUT/sanitizer.txt" compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" "$SANITIZE"
            grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.txt" | tail -1 | tee -a "$SUMMARY"
        done
    else
        note "[sanitizer] compute-sanitizer not on PATH"
    fi
fi

# ---- the timing rows, one line each (both modes)
"$PY" - "$OUT/moments.json" "$OUT/locality.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
for path in sys.argv[1:]:
    try:
        doc = json.load(open(path))
    except Exception as e:
        print(f"no {path}: {e}"); continue
    print(f"{path.rsplit('/', 1)[-1]}: {doc.get('device')}{' (dry run: times mean nothing)' if doc.get('dry_run') else ''}")
    for r in doc["rows"]:
        if "error" in r:
            print(f"  {r.get('impl', r.get('bench'))} {r.get('n', r.get('t'))} ERROR {r['error'][:200]}"); continue
        if "impl" in r:
            cfg = {k: r[k] for k in ("block", "bk", "num_warps", "num_stages") if k in r}
            print(f"  {r['impl']:6s} N={r['N']} n={r['n']:5d} {r['seconds']*1e3:9.2f} ms {r['tops']:7.2f} TOPS ({r['pct_of_int8_peak']:4.1f}% of 1979)"
                  f" exact={r.get('exact')} | torch f64 X^T X {r['torch_f64_seconds']*1e3:8.2f} ms {cfg or ''}")
        elif r["bench"] == "locality_gpu":
            print(f"  t={r['t']:3d} density={r['density']:.3f} blocks={r['block_density']:.2f} single={r['single_window']!s:5} split={r['hi_lo_split']!s:5}"
                  f" {r['seconds']*1e3:9.2f} ms (first call {r['first_call_s']:.1f} s) rel_err={r['rel_err']:.1e}"
                  f" | official {r['official_s']*1e3:8.1f} ms reference {r['reference_f32_s']*1e3:8.1f} ms")
        elif r["bench"] == "locality_gpu average":
            print(f"  average over {r['steps']} steps: {r['seconds']*1e3:.2f} ms/step (target {r['target_s']*1e3:.0f} ms: {'met' if r['meets_target'] else 'NOT met'}),"
                  f" max rel_err {r['max_rel_err']:.1e}")
        else:
            print(f"  optimal_denoise t={r.get('t')}: {r['seconds']*1e3:.2f} ms, reference {r['reference_f32_s']*1e3:.1f} ms, rel_err {r['rel_err']:.1e}")
EOF

note "== done in $SECONDS s, status $status"
exit $status
