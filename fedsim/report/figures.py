"""What every plot of the report shares: headless matplotlib, a colour and a marker per
strategy, axes in bytes (:func:`fedsim.progress.human_bytes`, as the tables) and in whole
rounds, labels that tell configurations apart, and the last step before saving: tick labels
thinned and annotations moved (or left out) until no two overlap (:func:`declutter`;
:func:`overlaps` is the check)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedsim.progress import human_bytes
from fedsim.report.tables import short

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
#: offsets tried for an annotation, in points from its point, with their alignment
PLACES = (
    (4, 4, "left"),
    (4, -11, "left"),
    (-4, 4, "right"),
    (-4, -11, "right"),
    (0, 9, "center"),
    (0, -17, "center"),
)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def palette(strategies: Iterable[str]) -> dict[str, tuple[str, str]]:
    """A colour and a marker per strategy (sorted by name, so every plot agrees)."""
    names = sorted(set(strategies))
    return {s: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, s in enumerate(names)}


#: values that mean "not set": a label leaves such a key out (FedIT has no client ranks)
UNSET = (None, "", "null", "None")


def label(row: dict[str, Any], keys: Sequence[str]) -> str:
    """``fedavg, lr=0.01, compressor=topk``: the values of ``keys`` (``sim.``, ``task.`` and
    ``adapter.`` left off the names; the strategy by its name alone; keys not set left out)."""
    return ", ".join(
        str(row.get(k)) if k == "strategy" else f"{short(k)}={row.get(k)}"
        for k in keys
        if k == "strategy" or row.get(k) not in UNSET
    )


def bytes_label(value: float, _pos=None) -> str:
    return human_bytes(value)


def bytes_axis(axis, values: Sequence[float]) -> bool:
    """Byte ticks on ``axis`` (an x or y axis) for the ``values`` plotted: a log scale when
    they span more than a factor of 10, else linear; True for log."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    positive = [v for v in values if v > 0]
    log = bool(positive) and max(positive) / min(positive) > 10
    if log:
        axis.axes.set_xscale("log") if axis is axis.axes.xaxis else axis.axes.set_yscale("log")
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(NullFormatter())
    elif positive:
        axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10], min_n_ticks=2))
        low, high = min(positive), max(positive)
        if high - low < 0.4 * high:  # ticks far enough apart to read differently
            middle = (low + high) / 2
            lim = (middle - 0.25 * high, middle + 0.25 * high)
            axis.axes.set_xlim(lim) if axis is axis.axes.xaxis else axis.axes.set_ylim(lim)
    axis.set_major_formatter(FuncFormatter(bytes_label))
    return log


def integer_axis(axis) -> None:
    """Whole-number ticks (rounds)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def title_above(fig, title) -> None:
    """Lay ``fig`` out tightly, then move its title ``title`` (``fig.suptitle``'s) above its
    panels' titles and the legends set above them, which ``tight_layout`` leaves it to run
    into (and cannot make room for when long upright tick names fill the height: its warning
    saying so is not shown, this is the remedy); the saved image (``bbox_inches="tight"``)
    grows to hold it."""
    import warnings

    _room_for_ticks(fig)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)
    if title.get_window_extent(renderer).y0 < top:
        title.set_y(top / fig.bbox.height + 0.01)
        title.set_verticalalignment("bottom")


def _room_for_ticks(fig, share: float = 0.25) -> None:
    """Make ``fig`` taller by the height of its tallest x tick labels (upright names of the
    side-by-side columns) where they would take more than ``share`` of a row: else
    ``tight_layout`` squeezes the panels into what is left, or gives up when the labels do
    not fit at all."""
    renderer = _layout(fig)
    rows = max((ax.get_subplotspec().get_gridspec().nrows for ax in fig.axes), default=1)
    tallest = max(
        (t.get_window_extent(renderer).height for ax in fig.axes for t in tick_labels(ax.xaxis)),
        default=0.0,
    )
    extra = tallest / fig.dpi  # inches
    if extra > share * fig.get_figheight() / rows:
        fig.set_figheight(fig.get_figheight() + rows * extra)


def save(fig, path: Path, note_ax=None) -> None:
    """Declutter (a note under ``note_ax``'s x label when labels had to go), save, close."""
    hidden = declutter(fig)
    if hidden and note_ax is not None:
        note = f"({hidden} point label(s) left out where they would overlap)"
        note_ax.set_xlabel(note_ax.get_xlabel() + "\n" + note)
        declutter(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def declutter(fig, passes: int = 3) -> int:
    """Thin each axis's tick labels, then place each annotation where it overlaps nothing, else
    hide it; returns how many annotations were hidden."""
    hidden = 0
    for _ in range(passes):
        renderer = _layout(fig)
        thinned = [_thin(axis, renderer) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)]
        if not any(thinned):
            hidden += sum(_place(ax, renderer) for ax in fig.axes)
            break
    return hidden


def _layout(fig):
    """Lay the figure out as it will be drawn (without painting it); its renderer."""
    if not hasattr(fig.canvas, "get_renderer"):  # a closed figure: lay it out with Agg
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.draw_without_rendering()
    return fig.canvas.get_renderer()


def _boxes(texts, renderer, pad: float = 2.0) -> list:
    return [t.get_window_extent(renderer).padded(pad / 2) for t in texts]


def _any_overlap(boxes) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def _ticks(axis) -> list:
    """The major ticks whose label is drawn (visible, non-empty, inside the view)."""
    low, high = sorted(axis.get_view_interval())
    lax = 1e-9 * (high - low)
    return [
        tick
        for tick in axis.get_major_ticks()
        if tick.label1.get_visible()
        and tick.label1.get_text()
        and low - lax <= tick.get_loc() <= high + lax
    ]


def tick_labels(axis) -> list:
    """The tick labels drawn on ``axis``."""
    return [tick.label1 for tick in _ticks(axis)]


#: an axis whose every tick names something (a column per configuration): its labels are made
#: smaller, down to this size, before any is left out
NAMED = "_fedsim_named"
SMALLEST = 4.5


def name_every_tick(axis) -> None:
    """Mark ``axis`` as :data:`NAMED`."""
    setattr(axis, NAMED, True)


def _thin(axis, renderer) -> bool:
    """Keep every n-th tick label, the smallest n at which none overlap (on a :data:`NAMED`
    axis, first make them smaller); True when it changed them."""
    ticks = _ticks(axis)
    labels = [t.label1 for t in ticks]
    changed = False
    while getattr(axis, NAMED, False) and _any_overlap(_boxes(labels, renderer)):
        size = labels[0].get_fontsize() - 0.5
        if size < SMALLEST:
            break
        for text in labels:
            text.set_fontsize(size)
        changed = True
    if not _any_overlap(_boxes(labels, renderer)):
        return changed
    locs = [t.get_loc() for t in ticks]
    texts = [t.get_text() for t in labels]
    for step in range(2, len(labels) + 1):
        kept = list(range(0, len(labels), step))
        if not _any_overlap(_boxes([labels[i] for i in kept], renderer)):
            break
    axis.set_ticks([locs[i] for i in kept], labels=[texts[i] for i in kept])
    return True


def annotations(ax, hidden: bool = False) -> list:
    """The axes' visible annotations (``hidden``: all of them)."""
    from matplotlib.text import Annotation

    return [t for t in ax.texts if isinstance(t, Annotation) and (hidden or t.get_visible())]


def _place(ax, renderer) -> int:
    """Move each annotation to the first of :data:`PLACES` that overlaps no tick label, no
    annotated point, no annotation placed before it, and stays in the axes; hide it when none
    does."""
    taken = _boxes([*tick_labels(ax.xaxis), *tick_labels(ax.yaxis)], renderer)
    # every annotated point, also those whose label was left out in an earlier pass
    points = {note: _marker(ax, note) for note in annotations(ax, hidden=True)}
    frame = ax.get_window_extent(renderer)
    hidden = 0
    for note in annotations(ax):
        first = (*note.get_position(), note.get_horizontalalignment())
        if not hasattr(note, "_fedsim_first"):
            note._fedsim_first = first  # where its plot put it: tried first
        others = [*taken, *(b for n, b in points.items() if n is not note)]  # not its own point
        for dx, dy, ha in (note._fedsim_first, *PLACES):
            note.set_position((dx, dy))
            note.set_horizontalalignment(ha)
            box = _boxes([note], renderer)[0]
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
            if inside and box.y1 <= frame.y1 and not any(box.overlaps(b) for b in others):
                taken.append(box)
                break
        else:
            note.set_visible(False)
            hidden += 1
    return hidden


def _marker(ax, note, radius: float = 3.5):
    """The box of the point an annotation names (its marker: ``radius`` points, half the
    scatter plots' marker size and a little more), in pixels at the figure's dpi."""
    from matplotlib.transforms import Bbox, Transform

    coords = note.xycoords
    to_pixels = coords if isinstance(coords, Transform) else ax.transData
    x, y = to_pixels.transform(note.xy)
    r = radius * ax.figure.dpi / 72
    return Bbox.from_bounds(x - r, y - r, 2 * r, 2 * r)


def overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of texts that overlap, drawn at the figure's size: two tick labels of one axis,
    two annotations of one axes, an annotation and a tick label of its axes, the figure's
    title (or another figure-level text) and a panel's title or legend (empty for a readable
    figure)."""
    renderer = _layout(fig)
    found = []
    for title in fig.texts:  # the figure's own texts: fig.suptitle's among them
        if not title.get_text() or not title.get_visible():
            continue
        box = title.get_window_extent(renderer)
        for ax in fig.axes:
            panel = [ax.title] if ax.title.get_text() else []
            for other in (*panel, ax.get_legend()):
                if other is not None and other.get_visible():
                    if box.overlaps(other.get_window_extent(renderer)):
                        name = other.get_text() if other is ax.title else "legend"
                        found.append((title.get_text(), name))
    for ax in fig.axes:
        xs, ys, notes = tick_labels(ax.xaxis), tick_labels(ax.yaxis), annotations(ax)
        pairs = [
            (a, b) for texts in (xs, ys, notes) for i, a in enumerate(texts) for b in texts[i + 1 :]
        ]
        pairs += [(a, b) for a in notes for b in (*xs, *ys)]
        for a, b in pairs:
            if _boxes([a], renderer, 0.0)[0].overlaps(_boxes([b], renderer, 0.0)[0]):
                found.append((a.get_text(), b.get_text()))
    return found
