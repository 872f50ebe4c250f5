import matplotlib
import torch

from osdlib import viz

matplotlib.use("Agg")


def test_image_grid_upscales_small_images_to_blocks():
    x = torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8)
    grid = viz.image_grid(x, nrow=2, pad=1)
    # 8x8 digits are repeated 4x (32 px) with 2 px of white padding around each
    assert grid.shape == (2 + 32 + 2, 2 + 2 * (32 + 2), 3)
    block = grid[2:6, 2:6, 0]
    assert (block == block[0, 0]).all()  # one source pixel is a 4x4 block
    assert viz.image_grid(torch.zeros(1, 3, 32, 32), pad=0).shape == (32, 32, 3)


def test_show_image_rows_wraps_panels():
    x = torch.zeros(12, 1, 8, 8)
    fig = viz.show_image_rows({str(i): x for i in range(5)}, nrow=6, per_row=4)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(fig.axes) == 8 and len(titled) == 5


def test_print_table_aligns_and_shows_spreads(capsys):
    viz.print_table(
        [{"model": "a", "nfe": 1, "acc": 0.5, "acc_std": 0.01}, {"model": "longer", "nfe": 10}],
        {"model": "model", "nfe": "NFE", "acc": "accuracy:.3f"},
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["a", "1", "0.500±0.010"]
    assert lines[2].split() == ["longer", "10"]
    assert len({len(line.rstrip()) for line in lines[:2]}) == 1


def test_show_source_displays_wherever_it_stands_in_a_cell(monkeypatch):
    """It displays the code itself: a returned object would show only as a cell's last line
    (two calls in one cell had shown one source)."""
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    assert viz.show_source(viz.upscale_factor) is None
    assert len(shown) == 1 and "def upscale_factor" in shown[0].data
