"""The pictures the book shows: image grids, 2-D samples and trajectories, curves."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor


def setup(dpi: int = 80) -> None:
    """Modest-resolution PNG figures (keeps committed notebooks small)."""
    plt.rcParams.update(
        {
            "figure.dpi": dpi,
            "savefig.dpi": dpi,
            "figure.autolayout": True,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


def show_source(obj) -> None:
    """Show the source of a library function as code in the notebook and the book, wherever
    the call stands in its cell (a returned object would show only as a cell's last line)."""
    import inspect

    from IPython.display import Code, display

    display(Code(inspect.getsource(obj), language="python"))


def upscale_factor(x: Tensor, min_pixels: int = 32) -> int:
    """The integer factor that makes images at least ``min_pixels`` high (8x8 digits: 4)."""
    return max(1, -(-min_pixels // x.shape[-2]))


def image_grid(
    x: Tensor, nrow: int | None = None, pad: int = 1, scale: int | None = None
) -> np.ndarray:
    """A (H, W, C) array in [0, 1] tiling images ``x`` (N, C, H, W) given in [-1, 1] or uint8.

    Each image is first enlarged ``scale`` times by repeating pixels (default: to at least
    32 pixels high), so that small images stay sharp blocks when the page shows them."""
    from torchvision.utils import make_grid

    x = x.detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else (x.float().clamp(-1, 1) + 1) / 2
    scale = upscale_factor(x) if scale is None else scale
    if scale > 1:
        x = x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    nrow = nrow or int(np.ceil(np.sqrt(len(x))))
    grid = make_grid(x, nrow=nrow, padding=pad * max(1, scale // 2), pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def show_images(
    x: Tensor, title: str | None = None, nrow: int | None = None, ax=None, size: float = 3.0
):
    """Show a grid of images; returns the axis."""
    if ax is None:
        _, ax = plt.subplots(figsize=(size, size))
    grid = image_grid(x, nrow)
    ax.imshow(
        grid.squeeze(-1) if grid.shape[-1] == 1 else grid,
        cmap="gray",
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def show_image_rows(
    grids: Mapping[str, Tensor],
    nrow: int | None = None,
    size: float | None = None,
    per_row: int = 4,
):
    """Several grids, one per title, ``per_row`` side by side (more wrap to a new row).

    ``size`` is the width of each grid in inches; by default one screen pixel per pixel of
    the enlarged grid (see :func:`image_grid`), so digits are drawn as crisp blocks."""
    first = image_grid(next(iter(grids.values())), nrow)
    if size is None:
        size = first.shape[1] / plt.rcParams["figure.dpi"]
    height = size * first.shape[0] / first.shape[1]
    cols = min(per_row, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(size * cols + 0.1 * cols, (height + 0.35) * rows), squeeze=False
    )
    for ax in axes.flat[len(grids) :]:
        ax.set_axis_off()
    for ax, (title, x) in zip(axes.flat, grids.items()):
        show_images(x, title, nrow, ax)
    return fig


def table_cells(rows: Sequence[Mapping], columns: Mapping[str, str]) -> list[list[str]]:
    """The header and the rows of a table as strings: ``columns`` maps a key to its header,
    optionally ``"header:format"`` (e.g. ``{"accuracy": "accuracy:.3f"}``). A column with a
    ``<key>_std`` in a row (several seeds, see ``metrics.over_seeds``) shows ``mean±std``;
    missing values are blank."""
    specs = []
    for key, head in columns.items():
        head, _, fmt = head.partition(":")
        specs.append((key, head, fmt))
    return [[head for _, head, _ in specs]] + [[cell(r, k, f) for k, _, f in specs] for r in rows]


def cell(r: Mapping, key: str, fmt: str = "") -> str:
    """``r[key]`` formatted with ``fmt``, followed by ``±<r[key + "_std"]>`` where the row has
    a seed spread; blank when the row has no ``key``."""
    v = r.get(key)
    if v is None:
        return ""
    text = format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)
    if r.get(f"{key}_std") is not None:
        text += "±" + format(r[f"{key}_std"], fmt or "g")
    return text


def print_table(rows: Sequence[Mapping], columns: Mapping[str, str]) -> None:
    """Print ``rows`` as an aligned text table (``columns`` as in :func:`table_cells`)."""
    table = table_cells(rows, columns)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
            ).rstrip()
        )


def markdown_table(rows: Sequence[Mapping], columns: Mapping[str, str]):
    """``rows`` as a Markdown table that the notebook and the book render (``columns`` as in
    :func:`table_cells`; text columns left-aligned, the others right-aligned)."""
    from IPython.display import Markdown

    table = table_cells(rows, columns)
    numeric = [all(not c or c[0] in "0123456789-+." for c in col[1:]) for col in zip(*table)]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in table]
    rule = "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"
    return Markdown("\n".join([lines[0], rule, *lines[1:]]))


def show_image_table(rows: Mapping[str, Tensor], cell: float = 0.6, fontsize: int = 8):
    """One row of images per title, the title on the left: the same problems before and
    after something (``cell`` inches per image, pixels drawn as blocks)."""
    n = max((len(x) for x in rows.values()), default=0)
    if n == 0:
        raise ValueError("show_image_table: no images to show")
    fig, axes = plt.subplots(len(rows), 1, figsize=(cell * n + 1.6, cell * len(rows) + 0.1))
    for ax, (title, x) in zip(np.atleast_1d(axes), rows.items()):
        show_images(x, None, nrow=n, ax=ax)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=fontsize)
    fig.subplots_adjust(left=1.5 / (cell * n + 1.6), right=0.99, top=0.98, bottom=0.02, hspace=0.08)
    return fig


def scatter2d(
    x: Tensor,
    ax=None,
    title: str | None = None,
    lim: float = 6.0,
    s: float = 1.0,
    color: str = "C0",
    alpha: float = 0.5,
):
    """A 2-D sample as a scatter plot on [-lim, lim]^2."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    x = x.detach().cpu()
    ax.scatter(x[:, 0], x[:, 1], s=s, c=color, alpha=alpha, linewidths=0)
    return _square(ax, lim, title)


def _square(ax, lim: float, title: str | None):
    """A bare square [-lim, lim]^2 panel for 2-D pictures."""
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def scatter_row(
    samples: Mapping[str, Tensor],
    lim: float = 6.0,
    size: float = 2.2,
    reference: Tensor | None = None,
):
    """One scatter per entry (title -> samples), optionally over a grey reference sample."""
    fig, axes = plt.subplots(1, len(samples), figsize=(size * len(samples), size + 0.3))
    for ax, (title, x) in zip(np.atleast_1d(axes), samples.items()):
        if reference is not None:
            scatter2d(reference, ax, lim=lim, color="0.8", alpha=0.4)
        scatter2d(x, ax, title, lim)
    return fig


def trajectories2d(
    traj: Sequence[Tensor], ax=None, n: int = 200, lim: float = 6.0, title: str | None = None
):
    """ODE paths from noise (grey dots) to samples (blue dots); ``traj`` is a list of (N, 2)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 3.2))
    path = torch.stack([p[:n].cpu() for p in traj])  # (T, n, 2)
    ax.plot(path[:, :, 0], path[:, :, 1], color="C1", lw=0.5, alpha=0.5)
    ax.scatter(path[0, :, 0], path[0, :, 1], s=3, c="0.4", label="noise z (t=1)")
    ax.scatter(path[-1, :, 0], path[-1, :, 1], s=3, c="C0", label="sample (t=0)")
    return _square(ax, lim, title)


def loss_curve(
    history: Mapping[str, Sequence[float]],
    keys: Sequence[str] = ("loss",),
    ax=None,
    title: str | None = None,
    logy: bool | None = None,
):
    """Training curves from a :func:`osdlib.train.train` history (log scale when the values
    span more than a decade, unless ``logy`` says otherwise)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 2.6))
    for k in keys:
        ax.plot(history["step"], history[k], label=k)
    values = [v for k in keys for v in history[k]]
    if logy is None:
        logy = min(values) > 0 and max(values) / min(values) > 10
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def metric_vs_nfe(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    ylabel: str,
    ax=None,
    title: str | None = None,
    logy: bool = False,
):
    """Quality against number of function evaluations, one line per sampler/model."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 2.8))
    for label, (nfe, vals) in curves.items():
        ax.plot(nfe, vals, marker="o", ms=3, label=label)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def vector_field(
    fn: Callable[[Tensor], Tensor],
    ax=None,
    lim: float = 6.0,
    n: int = 21,
    title: str | None = None,
    color: str = "C3",
):
    """Arrows of a 2-D vector field ``fn(points) -> vectors`` on an n x n grid of
    [-lim, lim]^2, each scaled to unit length (the direction is what the picture shows)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    g = torch.linspace(-lim, lim, n)
    pts = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        v = fn(pts).detach().cpu()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    ax.quiver(pts[:, 0], pts[:, 1], v[:, 0], v[:, 1], color=color, width=0.004, scale=n * 1.1)
    return _square(ax, lim, title)
