#!/usr/bin/env bash
# One-shot GPU check of the moments backends, for a lent H100/H200 (device tool `run`):
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
#
# builds and installs the package with _C_cuda (sm_90), runs the GPU tests, checks the
# SASS for int8 tensor-core instructions, runs compute-sanitizer (memcheck, racecheck)
# on small updates, and times the uint8 path at n = 12288 (N = 20000, data on the
# device) against torch float64 X^T X. Everything lands in $OUT (default ./gpu_check_out):
#   summary.txt   the lines worth reading first
#   build.log     pip/CMake/nvcc output
#   pytest.txt    GPU tests (tests/test_moments_gpu.py, tests/test_build.py)
#   sanitizer.txt compute-sanitizer reports
#   timing.json   one row per (backend, n, launch config): seconds, TOPS, % of int8 peak
#   pytest_locality.txt, locality_timing.json  the Triton locality/optimal denoiser: GPU
#                 tests, and per-DDIM-step timings at the CIFAR shape (see the end)
# Each step is time-boxed and a failing step does not stop the later ones; the exit
# status is non-zero if any step failed. No network is needed (pip --no-deps,
# --no-build-isolation: the image already has torch, triton, scikit-build-core, pybind11).
set -u
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
status=0
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME TIMEOUT_S LOGFILE CMD...
    local name=$1 t=$2 log=$3
    shift 3
    local t0=$SECONDS
    timeout "$t" "$@" >>"$log" 2>&1
    local rc=$?
    note "[$name] rc=$rc ($((SECONDS - t0)) s)"
    [ $rc -eq 0 ] || status=1
    return $rc
}

note "== $(date -u +%FT%TZ) $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$SUMMARY"
"$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$SUMMARY"
nvcc --version 2>&1 | tail -2 | tee -a "$SUMMARY"

# ---- build (sm_90 is the CMake default)
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
step build 300 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v .
"$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import analytic_diffusion as ad
info = ad.build_info()["cuda"]
print("build_info.cuda:", {k: info.get(k) for k in ("available", "architectures", "device_count", "device_error", "error")})
print("moments backends on cuda:", ad.available_backends("moments", "cuda"))
EOF

# ---- SASS: the SYRK kernel must use int8 tensor-core instructions (IMMA), no local memory
SO=$("$PY" -c "import analytic_diffusion._C_cuda as m; print(m.__file__)" 2>/dev/null)
if [ -n "$SO" ]; then
    cuobjdump -sass "$SO" >"$OUT/sass.txt" 2>&1
    note "[sass] IMMA instructions: $(grep -c 'IMMA' "$OUT/sass.txt")  LDSM: $(grep -c 'LDSM' "$OUT/sass.txt")  local-memory ops (LDL/STL): $(grep -cE '\b(LDL|STL)\b' "$OUT/sass.txt")"
    grep -m3 'IMMA' "$OUT/sass.txt" | sed 's/^ */  /' | tee -a "$SUMMARY"
    gzip -f "$OUT/sass.txt"
else
    note "[sass] _C_cuda not importable"; status=1
fi

# ---- tests (the CUDA and Triton tests; the interpreter subprocess test runs too)
step tests 300 "$OUT/pytest.txt" "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_moments_gpu.py tests/test_build.py
tail -n 3 "$OUT/pytest.txt" | tee -a "$SUMMARY"

# ---- compute-sanitizer on small updates (uninitialised / out-of-bounds / shared-memory races)
cat >/tmp/ad_sanitize.py <<'EOF'
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
        step "sanitizer-$tool" 150 "$OUT/sanitizer.txt" compute-sanitizer --tool "$tool" \
            --error-exitcode 9 "$PY" /tmp/ad_sanitize.py
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.txt" | tail -1 | tee -a "$SUMMARY"
    done
else
    note "[sanitizer] compute-sanitizer not on PATH"
fi

# ---- timing: n = 12288 (and 3072), N = 20000 images on the device
step timing 240 "$OUT/timing.log" "$PY" benchmarks/bench_moments_gpu.py --N 20000 --n 3072 12288 --json "$OUT/timing.json"
"$PY" - "$OUT/timing.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception as e:
    print("no timing.json:", e); sys.exit(0)
for r in rows:
    if "error" in r:
        print(f"  {r['impl']:6s} n={r['n']:5d} ERROR {r['error'][:160]}"); continue
    cfg = {k: r[k] for k in ("block", "bk", "num_warps", "num_stages") if k in r}
    print(f"  {r['impl']:6s} n={r['n']:5d} {r['seconds']*1e3:8.2f} ms {r['tops']:7.1f} TOPS ({r['pct_of_int8_peak']:4.1f}% of 1979)"
          f" exact={r.get('exact')} | torch f64 X^T X {r['torch_f64_seconds']*1e3:8.2f} ms"
          f" | torch._int_mm {r.get('torch_int_mm_tops', float('nan')):6.1f} TOPS {cfg or ''}")
EOF

# ---- locality_denoise / optimal_denoise, Triton backend (tests/test_locality_triton.py,
# benchmarks/bench_locality_gpu.py): GPU tests (fixed and autotuned launch shapes, accuracy
# vs float64 at every DDIM step), then the CIFAR-shape timing (N = 50000, n = 3072, B = 128,
# 10 DDIM steps; target <= 0.06 s per step averaged). AD_CHECK_LOCALITY=0 skips both.
if [ "${AD_CHECK_LOCALITY:-1}" != "0" ]; then
    step locality-tests 300 "$OUT/pytest_locality.txt" "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_locality_triton.py
    tail -n 3 "$OUT/pytest_locality.txt" | tee -a "$SUMMARY"
    step locality-timing 300 "$OUT/locality_timing.log" "$PY" benchmarks/bench_locality_gpu.py --json "$OUT/locality_timing.json"
    "$PY" - "$OUT/locality_timing.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception as e:
    print("no locality_timing.json:", e); sys.exit(0)
for r in rows:
    if "error" in r:
        print(f"  {r['bench']} t={r.get('t')} ERROR {r['error'][:200]}"); continue
    if r["bench"] == "locality_gpu":
        print(f"  t={r['t']:3d} density={r['density']:.3f} blocks={r['block_density']:.2f} single={r['single_window']!s:5} split={r['hi_lo_split']!s:5}"
              f" {r['seconds']*1e3:8.2f} ms (first call {r['first_call_s']:.1f} s) rel_err={r['rel_err']:.1e}"
              f" | official {r['official_s']*1e3:8.1f} ms ({r['speedup_vs_official']:.1f}x) reference {r['reference_f32_s']*1e3:8.1f} ms")
    elif r["bench"] == "locality_gpu average":
        print(f"  average over {r['steps']} steps: {r['seconds']*1e3:.2f} ms/step (target {r['target_s']*1e3:.0f} ms: {'met' if r['meets_target'] else 'NOT met'}),"
              f" max rel_err {r['max_rel_err']:.1e}, official {r['official_s']*1e3:.1f} ms/step")
    else:
        print(f"  optimal_denoise t=300: {r['seconds']*1e3:.2f} ms, reference {r['reference_f32_s']*1e3:.1f} ms, rel_err {r['rel_err']:.1e}")
EOF
fi

note "== done, status $status"
exit $status
