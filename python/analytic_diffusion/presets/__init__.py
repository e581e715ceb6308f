"""Published settings of the analytical models: what each published code uses, per dataset.

The values are plain tables in :mod:`.published` (each citing its source). This module turns
them into constructor arguments and denoisers:

- :func:`settings` ``(method, dataset) -> dict``: the keyword arguments of the method's
  denoiser class that reproduce the published code on that dataset;
- :func:`build` ``(method, train, dataset=None, *, moments=None, **overrides) -> Denoiser``:
  the denoiser itself (``dataset=None``: the library's defaults);
- :data:`METHODS`, :func:`datasets` ``(method)``: what exists.

Methods (docs/algorithms.md section in brackets):

========================  =====================================================================
``locality``              the locality paper's denoiser: WSSM, chunk = its loader's batch size,
                          its threshold (§4, §5, §8.2; ``published.LOCALITY``)
``golddiff``              GoldDiff screening of the locality denoiser (§12; ``published.GOLDDIFF``)
``wiener``, ``optimal``   no published settings beyond the defaults (any dataset)
``nearest``               the nearest training image to ``x_t / a`` (§6)
``nearest_dataset``       the locality paper's baseline: ``argmin ||x_t - y_k||``, unscaled (§8.2)
``scfdm``                 smoothed closed-form model (§11; ``published.SCFDM``)
``pspc``                  PSPC-square with the published CIFAR-10 schedule; the training set is
                          augmented with horizontal flips as the published sampler does (§13)
``els``, ``ls``           Kamb & Ganguli machines with the published UNet patch-size schedule;
                          ``els`` is the zero-padded bbELS the schedules were calibrated for (§10)
========================  =====================================================================

Dataset keys: ``"cifar10"``, ``"mnist"``, ``"fashion_mnist"``, ``"celeba_hq"``, ``"afhq"``
(``els``/``ls`` also ``"celeba"``, the 32 x 32 CelebA of Kamb & Ganguli, or any schedule
name of ``denoisers.schedules.KAMB_GANGULI_SCHEDULES``). ``"cifar-10"``, ``"CIFAR10"``,
``"fashion-mnist"``, ``"celeba-hq"`` are accepted spellings.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from . import published

__all__ = ["DATASETS", "METHODS", "build", "datasets", "normalize_dataset", "published", "settings"]

DATASETS = ("cifar10", "mnist", "fashion_mnist", "celeba_hq", "afhq")
METHODS = ("locality", "golddiff", "wiener", "optimal", "nearest", "nearest_dataset", "scfdm", "pspc", "els", "ls")


def normalize_dataset(name) -> str:
    """``"CIFAR-10"`` -> ``"cifar10"``, ``"fashion-mnist"`` -> ``"fashion_mnist"``, ``"celeba-hq"`` -> ``"celeba_hq"``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"dataset must be a name such as 'cifar10', got {name!r}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return {"cifar_10": "cifar10", "fashionmnist": "fashion_mnist", "celebahq": "celeba_hq"}.get(key, key)


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def datasets(method: str) -> List[str]:
    """The dataset keys that have published settings for ``method`` (every dataset for
    ``wiener``, ``optimal``, ``nearest``, ``nearest_dataset``)."""
    from ..denoisers.schedules import KAMB_GANGULI_SCHEDULES

    m = _check_method(method)
    if m == "locality":
        return sorted(published.LOCALITY)
    if m == "golddiff":
        return sorted(published.GOLDDIFF)
    if m == "scfdm":
        return sorted(k for k in published.SCFDM if k != "default")
    if m == "pspc":
        return sorted(published.PSPC_SQUARE)
    if m in ("els", "ls"):
        return sorted(published.KAMB_GANGULI) + sorted(KAMB_GANGULI_SCHEDULES)
    return list(DATASETS)


def settings(method: str, dataset: str) -> Dict[str, object]:
    """Constructor keyword arguments that reproduce the published code of ``method`` on
    ``dataset`` (a new dict each call; see the module docstring).

    >>> settings("locality", "cifar10")
    {'softmax': 'wssm', 'chunk_size': 512, 'threshold': 0.05, 'temperature': 1.0}
    """
    from ..denoisers.schedules import KAMB_GANGULI_SCHEDULES

    m = _check_method(method)
    ds = normalize_dataset(dataset)
    have = datasets(m)
    if m in ("els", "ls"):
        sched = published.KAMB_GANGULI.get(ds)
        if sched is None:
            key = dataset.strip().lower().replace("_", "-")
            if key not in KAMB_GANGULI_SCHEDULES:
                raise ValueError(f"no published {m} schedule for dataset {dataset!r}; available: {', '.join(have)}")
            sched = key
        out: Dict[str, object] = {"patch_size": sched}
        if m == "els":
            out["padding"] = KAMB_GANGULI_SCHEDULES[sched]["padding"]
        return out
    if ds not in have:
        raise ValueError(f"no published {m} settings for dataset {dataset!r}; available: {', '.join(have)}")
    if m == "locality":
        return dict(published.LOCALITY[ds])
    if m == "golddiff":
        g = published.GOLDDIFF[ds]
        return {"threshold": g["threshold"], "temperature": g["temperature"], "softmax": "exact",
                "screening": "golddiff", "screening_options": {"preset": ds}}
    if m == "scfdm":
        return dict(published.SCFDM[ds])
    if m == "pspc":
        return {"patch_size": ds}
    if m == "nearest_dataset":
        return dict(published.NEAREST_DATASET)
    return {}  # wiener, optimal, nearest: the library's defaults are the published ones


def build(method: str, train, dataset: Optional[str] = None, *, moments=None, **overrides):
    """The denoiser of ``method`` on ``train`` (uint8 or float ``[N, C, H, W]``, any source
    ``ad.data.load_images`` takes) with the published settings of ``dataset`` (None: the
    library's defaults; ``els``/``ls`` and ``pspc`` then need ``patch_size=`` in
    ``overrides``). ``overrides`` win over the preset (e.g. ``backend=``, ``threshold=``).
    ``moments``: full or patch moments for ``locality``/``golddiff``/``wiener`` (estimated
    from ``train`` when None). For ``pspc`` with the published CIFAR-10 settings the
    training set is augmented with its horizontal flips (``xflip``) unless
    ``xflip=False`` is given."""
    from .. import denoisers as d
    from ..denoisers.base import as_train
    from ..ops import estimate_moments

    m = _check_method(method)
    kw: Dict[str, object] = {} if dataset is None else settings(m, dataset)
    if m == "nearest_dataset" and dataset is None:
        kw = dict(published.NEAREST_DATASET)
    xflip = overrides.pop("xflip", None)
    if xflip is not None and m != "pspc":
        raise ValueError(f"xflip= is an option of pspc only, not {m}")
    kw.update(overrides)
    if m in ("locality", "golddiff"):
        if m == "golddiff" and dataset is None:
            kw.setdefault("screening", "golddiff")
        return d.LocalityDenoiser(train, moments, **kw)
    if m == "wiener":
        if moments is None:
            moments = estimate_moments(as_train(train))
        return d.WienerDenoiser(moments, **kw)
    if moments is not None:
        raise ValueError(f"moments= is used by locality, golddiff and wiener only, not {m}")
    if m == "optimal":
        return d.OptimalDenoiser(train, **kw)
    if m in ("nearest", "nearest_dataset"):
        return d.NearestDenoiser(train, **kw)
    if m == "scfdm":
        return d.SmoothedCFDMDenoiser(train, **kw)
    if "patch_size" not in kw:
        raise ValueError(f"{m} needs a patch-size schedule: give dataset= (one of {', '.join(datasets(m))}) or patch_size=")
    if m == "pspc":
        ps = kw.pop("patch_size")
        flip = published.PSPC_SQUARE[normalize_dataset(dataset)]["xflip"] if (dataset is not None and isinstance(ps, str)) else False
        if xflip is not None:
            flip = bool(xflip)
        if flip:
            import torch

            t = as_train(train)
            train = torch.cat([t, t.flip(-1)])
        return d.PSPCSquareDenoiser(train, ps, **kw)
    ps = kw.pop("patch_size")
    if m == "els":
        return d.ELSDenoiser(train, ps, **kw)
    return d.LSDenoiser(train, ps, **kw)
