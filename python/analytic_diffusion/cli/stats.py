"""``analytic-diffusion stats``: full or patch moments of a dataset to a safetensors file."""
from __future__ import annotations

import time
from pathlib import Path

from .common import CLIError, add_common_args, backend_arg, check_device, mkdir, pick_backends, positive_int, say, user_input


def add_parser(sub) -> None:
    st = sub.add_parser(
        "stats",
        help="dataset moments (mean, covariance) to a safetensors file",
        description="Stream a dataset (image folder, .npy, .npz) once and save its mean and unbiased covariance "
        "(or stationary k x k patch moments) to a safetensors file readable by Moments.load.",
    )
    st.add_argument("data", help="an image folder, a .npy or a .npz file (uint8, or float in [-1, 1])")
    st.add_argument("--out", required=True, help="output .safetensors file")
    st.add_argument("--batch-size", type=positive_int, default=256, help="images per batch (default: 256)")
    st.add_argument("--patch-size", type=positive_int, default=None, metavar="K", help="patch moments of K x K windows (K odd) instead of full-image moments")
    add_common_args(st, "moments backend")
    st.set_defaults(func=run)


def run(args) -> int:
    import analytic_diffusion as ad

    progress = not args.no_progress
    check_device(args.device)
    op = "moments" if args.patch_size is None else "patch_moments"
    backends = pick_backends(args.backend, [op], args.device)
    bk = backend_arg(backends, args.backend, op)
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder; give the name of the .safetensors file to write")
    K = args.patch_size
    if K is not None and K % 2 == 0:
        raise CLIError(f"--patch-size must be odd (patch_size is the side of a window centred on a pixel), got {K}")
    if out.parent != Path(""):
        mkdir(out.parent)  # fail on an unwritable place now, not after the pass over the data
    t0 = time.perf_counter()
    # the whole command streams the user's data: the data and accumulator checks speak about it
    with user_input():
        if K is None:
            m = ad.estimate_moments(args.data, batch_size=args.batch_size, device=args.device, backend=bk, progress=progress)
            what = f"full moments of {m.count} images of shape {tuple(m.image_shape or (m.n,))}"
        else:
            m = ad.estimate_patch_moments(args.data, K, batch_size=args.batch_size, device=args.device, backend=bk, progress=progress)
            what = f"{K}x{K} patch moments of {m.count} patches (patch vector {tuple(m.image_shape)})"
    elapsed = time.perf_counter() - t0
    m.extra = {"backend": backends[op], **m.extra, "source": str(args.data)}  # the op's own record wins
    try:
        m.to("cpu").save(out)
    except Exception as e:
        # safetensors reports I/O failures as its own SafetensorError, not as OSError
        if type(e).__name__ == "SafetensorError":
            raise CLIError(f"could not write {str(out)!r}: {e}") from None
        raise
    say(f"{what}: mean [{m.n}], cov [{m.n}, {m.n}] in {elapsed:.2f} s")
    say(f"wrote {out}")
    return 0
