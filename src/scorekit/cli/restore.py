"""``scorekit restore``: posterior samples of a trained run given a measurement ``y = A x + sigma_y n``.

    scorekit restore --run runs/digits --operator inpaint-left --sigma-y 0.05 --data y.npy --n 8 --out x.png
    scorekit restore --run runs/digits --operator downsample-2 --sigma-y 0.5 --clean digits --limit 4 \\
        --solver tds --nfe 100 --out sr.png

``--operator`` names the measurement (``scorekit.inverse.named``: denoise, inpaint-left/right/top/
bottom, inpaint-box[:top=,left=,height=,width=], inpaint-random[:p=,seed=], downsample-N,
blur-gauss[:sigma=], blur-uniform[:size=]). ``--data`` is the measurement in the data's own units
(e.g. digit pixels 0..16): one of the operator's output (``[...]`` or ``[N, ...]``; for an inpainting
mask also the full image, whose missing pixels are ignored); ``--sigma-y`` is its noise level in the
same units. ``--clean`` instead takes clean examples (a built-in name or a file) and measures them
here (``--limit`` of them, noise from ``--seed``), to try a solver. Each measurement gets ``--n``
samples at ``--nfe`` network evaluations per sample (``scorekit.inverse.nfe``; TDS's particles count).
``.npy`` holds ``[N, n, ...]`` samples in the data's units and layout; ``.png`` one row per measurement
(truth with ``--clean``, the measurement, the samples, their mean).
"""

from __future__ import annotations

import argparse
import io
import math
import sys

import numpy as np
import torch

from scorekit.cli import add_run_dir, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from scorekit.inverse import DEFAULT

    a = parser.add_argument
    add_run_dir(parser)
    a(
        "--operator",
        required=True,
        help="e.g. inpaint-left, downsample-2, blur-gauss:sigma=1, denoise",
    )
    a("--sigma-y", type=float, required=True, help="measurement noise, in the data's units (>= 0)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="the measurement, .npy in the data's units")
    src.add_argument("--clean", help="clean examples to measure here: built-in name or file")
    a("--limit", type=int, default=4, help="with --clean: how many examples (default 4)")
    a(
        "--solver",
        default=DEFAULT,
        help=f"posterior sampler (default {DEFAULT}; see docs/inverse-problems.md)",
    )
    a("--nfe", type=int, default=100, help="network evaluations per sample (default 100)")
    a(
        "--n",
        "--num-samples",
        dest="n",
        type=int,
        default=8,
        help="posterior samples per measurement (default 8)",
    )
    a("--out", required=True, metavar="FILE", help="output .npy (samples in data units) or .png")
    a("--seed", type=int, default=0)
    a("--batch", type=int, default=64, help="samples solved together (default 64)")
    a("--device", default="cpu")
    a("--no-progress", action="store_true")
    a("--debug", action="store_true", help="show tracebacks")


def _data_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """One model-layout image shape ``[C, H, W]`` in the data's layout (vectors unchanged)."""
    if layout == "NHW" and len(shape) == 3 and shape[0] == 1:
        return shape[1:]
    if layout == "NHWC" and len(shape) == 3:
        return (shape[1], shape[2], shape[0])
    return shape


def _to_model_layout(y: torch.Tensor, layout: str, shape: tuple[int, ...]) -> torch.Tensor:
    if layout == "NHW" and len(shape) == 3:
        return y.unsqueeze(1)
    if layout == "NHWC" and len(shape) == 3:
        return y.permute(0, 3, 1, 2)
    return y


def _measurement(path: str, op, info: dict, spec: str) -> torch.Tensor:
    """The ``--data`` file as ``[N, *op.out_shape]`` in the data's units, in the model's layout."""
    from scorekit.inverse import Mask

    try:
        y = torch.as_tensor(np.load(path, allow_pickle=False), dtype=torch.float64)
    except (OSError, ValueError) as e:
        raise ValueError(f"--data {path}: cannot read a .npy array ({e})") from None
    layout = info["normalization"]["layout"]
    out_d = _data_shape(tuple(op.out_shape), layout)
    in_d = _data_shape(tuple(op.in_shape), layout)
    if tuple(y.shape) in (out_d, in_d):
        y = y[None]
    if tuple(y.shape[1:]) == out_d:
        return _to_model_layout(y, layout, tuple(op.out_shape))
    if isinstance(op, Mask) and tuple(y.shape[1:]) == in_d:
        return op.forward(_to_model_layout(y, layout, tuple(op.in_shape)))
    allowed = [list(out_d)] + ([list(in_d)] if isinstance(op, Mask) else [])
    raise ValueError(
        f"--data {path}: a measurement of shape {list(y.shape)} does not fit --operator {spec} "
        f"(output {list(out_d)} per example, or [N, ...]); allowed: {allowed}"
    )


def _model_units(op, y: torch.Tensor, sigma_y: float, info: dict):
    """``(operator, y, sigma_y)`` acting on model units: ``x_data = scale x + shift`` is folded in."""
    from scorekit.inverse import Matrix, as_matrix

    shift = torch.tensor(info["normalization"]["shift"], dtype=torch.float64)
    scale = torch.tensor(info["normalization"]["scale"], dtype=torch.float64)
    ones = torch.ones(1, *op.in_shape, dtype=torch.float64)
    if scale.numel() == 1:
        return op, (y - op.forward(ones * shift)) / scale, sigma_y / float(scale)
    flat_shift = shift.reshape(1, *op.in_shape)
    scaled = Matrix(as_matrix(op) * scale.reshape(1, -1), shape=op.in_shape)
    return scaled, y - op.forward(flat_shift), sigma_y


def run(args: argparse.Namespace) -> int:
    from scorekit.bench.inverse import measurement_image, panel
    from scorekit.data import Normalization
    from scorekit.inverse import REGISTRY, named, posterior_samples
    from scorekit.runs import decode, load_levels, load_run, pixel_range

    suffix = check_output(args.out, suffixes=(".npy", ".png")).suffix.lower()
    if not (math.isfinite(args.sigma_y) and args.sigma_y >= 0):
        raise ValueError(f"--sigma-y must be a finite number >= 0; got {args.sigma_y}")
    if args.solver not in REGISTRY:
        raise ValueError(
            f"--solver: unknown posterior sampler {args.solver!r}; allowed: {sorted(REGISTRY)}"
        )
    for name in ("n", "nfe", "batch", "limit"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}")
    denoiser, info = load_run(args.run, device=args.device)
    op = named(args.operator, info["shape"])
    truth = None
    if args.data is not None:
        y = _measurement(args.data, op, info, args.operator)
        op_m, y_m, sy_m = _model_units(op, y, args.sigma_y, info)
    else:
        raw = load_levels(args.clean, info)[: args.limit]
        truth = Normalization.from_dict(info["normalization"]).encode(raw).to(torch.float64)
        op_m, _, sy_m = _model_units(op, op.forward(truth[:1]), args.sigma_y, info)
        g = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(truth.shape[0], *op_m.out_shape, generator=g, dtype=torch.float64)
        y_m = op_m.forward(truth) + sy_m * noise
    lo, hi = max(info["sigma_min"], 2e-3), min(info["sigma_max"], 80.0)
    x = posterior_samples(
        denoiser, y_m.to(device=args.device, dtype=torch.float32), op_m, sigma_y=sy_m, n=args.n, nfe=args.nfe,
        solver=args.solver, sigma_min=lo, sigma_max=hi, seed=args.seed, batch=args.batch,
        progress=not args.no_progress,
    ).cpu()  # fmt: skip
    if not torch.isfinite(x).all():
        raise FloatingPointError("some samples are not finite; try more --nfe or another --solver")
    m = x.shape[0]
    data = decode(x.reshape(m * args.n, *info["shape"]).float(), info)
    data = data.reshape(m, args.n, *data.shape[1:])
    if suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, data, allow_pickle=False)
        from scorekit._util import atomic_write

        atomic_write(args.out, buf.getvalue())
    else:
        if len(info["shape"]) != 3:
            raise ValueError("--out .png needs image data; write .npy for vectors")
        view = measurement_image(op_m, y_m.cpu())
        pic = [decode(v.float(), info) for v in (view, x.mean(1))]
        shown = truth if truth is None else decode(truth.float(), info)
        rows = [{"truth": None if shown is None else shown[j].squeeze(), "measurement": pic[0][j].squeeze(),
                 "samples": [s.squeeze() for s in data[j]], "mean": pic[1][j].squeeze()} for j in range(m)]  # fmt: skip
        lo_px, hi_px = pixel_range(info)
        panel(args.out, rows, lo=lo_px, hi=hi_px,
              title=f"{args.operator}, sigma_y {args.sigma_y}: {args.solver}, {args.nfe} NFE")  # fmt: skip
    print(
        f"wrote {m} x {args.n} posterior samples to {args.out}",
        file=sys.stderr if suffix == ".npy" else sys.stdout,
    )
    return 0
