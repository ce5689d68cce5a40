"""fedsim-report's plots are readable: every figure drawn at its default size (Agg) has no two
tick labels of an axis, no two annotations, and no annotation and tick label overlapping;
rounds are ticked in whole numbers, bytes in one human format; the overlay puts strategies on
shared axes; bands are t intervals with 3 seeds and the seeds' range with 2; points that would
hide each other are set apart."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from tests.test_report_choice import write_run

BYTES = re.compile(r"^\d+(\.\d)? (B|kB|MB|GB)$")


def _figures(monkeypatch):
    """The figures the report saves, by file name (still drawable after they are closed)."""
    import matplotlib.figure

    figures = {}
    save = matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):
        figures[path.name] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def _crowd(root):
    """4 strategies x 4 rates x 2 seeds, no validation split (every rate drawn), with a clock
    and differential privacy; two strategies at identical bytes."""
    job = 0
    for s, strategy in enumerate(["fedavg", "plugin", "fedsb", "flora"]):
        for k, lr in enumerate([0.001, 0.003, 0.01, 0.03]):
            for seed in (0, 1):
                up = [800_000, 800_000, 250_000, 5_000_000][s]
                acc = 0.2 + 0.1 * k + [0.0, 0.0, 0.04, 0.06][s] + 0.01 * seed
                folder = write_run(root / str(job), strategy, lr, seed, acc, up=up, down=up)
                _private_and_timed(folder, epsilon=1.0 + k + 0.1 * s, seconds=10.0 * (s + 1))
                job += 1


def _private_and_timed(folder, epsilon: float, seconds: float) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(privacy="dpsgd", epsilon=epsilon, sim_time_s=seconds * 3)
    summary["system"] = {"name": "mobile"}
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["sim_time_s"] = seconds * row["round"]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_overlap_check_finds_overlaps_and_declutter_removes_them():
    from fedsim.report.figures import declutter, overlaps, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    ax.set_xticks([i / 40 for i in range(41)], [f"{i} MB" for i in range(41)])
    for _ in range(3):
        ax.annotate("lr=0.01", (0.5, 0.5), xytext=(4, 4), textcoords="offset points")
    found = overlaps(fig)
    assert ("lr=0.01", "lr=0.01") in found and ("0 MB", "1 MB") in found
    hidden = declutter(fig)
    assert overlaps(fig) == [] and hidden <= 2  # moved where they fit, hidden where not
    visible = [t for t in ax.texts if t.get_visible()]
    assert len(visible) >= 1 and len(visible) + hidden == 3
    plt.close(fig)


def test_the_overlap_check_finds_the_figure_title_on_a_panel_title_or_legend():
    from fedsim.report.figures import overlaps, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1], label="FedIT")
    ax.set_title("panel")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.3))
    fig.suptitle("figure title", y=1.0)  # onto the panel's title and legend
    assert {("figure title", "panel"), ("figure title", "legend")} <= set(overlaps(fig))
    fig.suptitle("figure title", y=1.5)  # well above both
    assert overlaps(fig) == []
    plt.close(fig)


def test_a_point_label_never_covers_another_point_even_one_whose_label_was_left_out():
    from fedsim.report.figures import _layout, _marker, declutter, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    ax.plot([2], [5], "o")
    mine = ax.annotate("a label long enough to cross", (2, 5), xytext=(4, 4),
                       textcoords="offset points")  # fmt: skip
    box = mine.get_window_extent(_layout(fig))
    middle = ax.transData.inverted().transform(((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2))
    ax.plot(*middle, "o")  # a point under the label where it was first put ...
    other = ax.annotate("x", tuple(middle), xytext=(4, 4), textcoords="offset points")
    other.set_visible(False)  # ... whose own label was left out
    declutter(fig)
    assert mine.get_visible()
    assert not mine.get_window_extent(_layout(fig)).overlaps(_marker(ax, other))
    plt.close(fig)


@pytest.mark.parametrize("length", [10, 20, 40])
def test_long_upright_column_names_leave_the_panels_their_height(tmp_path, monkeypatch, length):
    """The side-by-side panel's names stand upright under it; ``tight_layout`` squeezed both
    panels into what they left of the figure's height (0.43 of 4.8 inches at length 20) or,
    longer, gave up: the figure grows instead, the panels keep at least 3 inches."""
    from fedsim.report import plot_pareto, report

    for k in range(8):
        method = f"adapter.init.method=m{k}_" + "x" * length
        write_run(tmp_path / "runs" / str(k), "fedavg", 0.01, 0, 0.5 + 0.01 * k,
                  up=1000 * (k + 1), extra=[method])  # fmt: skip
    figures = _figures(monkeypatch)
    done = report([tmp_path / "runs"], tmp_path / "out", plots=False)
    assert plot_pareto(done["groups"], tmp_path / "bytes.png", "every rate")
    fig = figures["bytes.png"]
    for ax in fig.axes:
        assert ax.get_position().height * fig.get_figheight() >= 3.0


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowd") / "runs"
    _crowd(root)
    return root


def test_every_figure_is_readable_at_its_default_size(crowded, tmp_path, monkeypatch):
    from fedsim.report import report
    from fedsim.report.figures import overlaps, tick_labels

    figures = _figures(monkeypatch)
    done = report([crowded], tmp_path)
    names = {
        "accuracy_by_round.png",
        "accuracy_by_round_overlay.png",
        "accuracy_vs_time.png",
        "accuracy_vs_bytes.png",
        "accuracy_vs_epsilon.png",
    }
    assert names <= set(figures) and names <= set(done["files"])
    for name in names:
        assert overlaps(figures[name]) == [], name
    for name in ("accuracy_by_round.png", "accuracy_by_round_overlay.png"):
        for ax in figures[name].axes:
            if ax.get_xlabel() == "round":
                ticks = [t.get_text() for t in tick_labels(ax.xaxis)]
                assert ticks and all(t.isdigit() for t in ticks), ticks
    cost, side = figures["accuracy_vs_bytes.png"].axes
    ticks = [t.get_text() for t in tick_labels(cost.xaxis)]
    assert len(ticks) >= 2 and all(BYTES.match(t) for t in ticks), ticks
    assert len(set(ticks)) == len(ticks)
    assert len(tick_labels(side.xaxis)) == 16  # a column per configuration, each named
    assert "side by side" in cost.get_xlabel()  # fedavg and plugin sent the same bytes


def test_the_overlay_puts_strategies_on_shared_axes(crowded, tmp_path, monkeypatch):
    from fedsim.report import plot_overlay, report

    figures = _figures(monkeypatch)
    done = report([crowded], tmp_path, plots=False)
    assert plot_overlay(done["groups"], tmp_path / "overlay.png", "every rate")
    (ax,) = figures["overlay.png"].axes
    labels = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert len(labels) == 16
    assert {label.split(",")[0] for label in labels} == {"fedavg", "plugin", "fedsb", "flora"}
    assert all(label.endswith("(2 seeds, min-max)") for label in labels)


def test_the_overlay_tells_apart_more_configurations_than_line_styles(tmp_path, monkeypatch):
    from fedsim.report import plot_overlay, report
    from fedsim.report.plots import DASHES

    rates = [0.0001 * 2**k for k in range(len(DASHES) + 3)]  # 9 configurations of one strategy
    for k, lr in enumerate(rates):
        write_run(tmp_path / "runs" / str(k), "fedavg", lr, 0, 0.5 + 0.01 * k)
    figures = _figures(monkeypatch)
    done = report([tmp_path / "runs"], tmp_path / "out", plots=False)
    assert plot_overlay(done["groups"], tmp_path / "overlay.png", "every rate")
    (ax,) = figures["overlay.png"].axes
    drawn = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    # a custom dash pattern reads back as "--": compare the pattern matplotlib draws
    styles = {(str(ln._unscaled_dash_pattern), ln.get_marker()) for ln in drawn}
    assert len(drawn) == len(rates) and len(styles) == len(rates)
    assert len({ln.get_color() for ln in drawn}) == 1  # one strategy, one colour


def test_a_strategys_extra_markers_are_not_another_strategys(tmp_path, monkeypatch):
    """A strategy's 7th configuration takes a marker that no strategy on the panel has: fedavg's
    ("o") extra lines must not wear fedsb's marker ("s", the next in the palette)."""
    from fedsim.report import plot_overlay, report
    from fedsim.report.plots import DASHES

    for k in range(len(DASHES) + 2):
        write_run(tmp_path / "runs" / f"a{k}", "fedavg", 0.0001 * 2**k, 0, 0.5 + 0.01 * k)
    write_run(tmp_path / "runs" / "b", "fedsb", 0.01, 0, 0.6)
    figures = _figures(monkeypatch)
    done = report([tmp_path / "runs"], tmp_path / "out", plots=False)
    assert plot_overlay(done["groups"], tmp_path / "overlay.png", "every rate")
    (ax,) = figures["overlay.png"].axes
    drawn = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    fedsb = {ln.get_marker() for ln in drawn if ln.get_label().startswith("fedsb")}
    fedavg = {ln.get_marker() for ln in drawn if ln.get_label().startswith("fedavg")}
    assert len(fedsb) == 1 and len(fedavg) == 2 and not fedsb & fedavg


def test_labels_leave_out_settings_not_set_and_the_group_names():
    from fedsim.report.figures import label

    keys = ["strategy", "adapter.client_ranks", "adapter.init.method", "sim.lr", "compressor"]
    fedit = {"strategy": "fedavg", "adapter.client_ranks": "null", "adapter.init.method": "eva",
             "sim.lr": 0.01, "compressor": "topk"}  # fmt: skip
    fedsb = {"strategy": "fedsb", "adapter.client_ranks": "", "adapter.init.method": "gradient",
             "sim.lr": 0.01}  # fmt: skip
    flora = {**fedit, "strategy": "flora", "adapter.client_ranks": "[2,4]"}
    assert label(fedit, keys) == "fedavg, init.method=eva, lr=0.01, compressor=topk"
    assert label(fedsb, keys) == "fedsb, init.method=gradient, lr=0.01"
    assert label(flora, keys).startswith("flora, client_ranks=[2,4], init.method=eva")


def test_one_seed_draws_no_bars_nor_overlay_band_note(tmp_path, monkeypatch):
    """With one seed a point has no interval: no bar (nor a bar in the legend's handle), and
    the overlay does not say bands were left off when there were none to draw."""
    from fedsim.report import plot_overlay, plot_pareto, report
    from fedsim.report.plots import BANDS

    for k in range(BANDS + 1):  # more lines than BANDS, one seed each
        write_run(tmp_path / "runs" / str(k), "fedavg", 0.0001 * 2**k, 0, 0.5 + 0.01 * k)
    figures = _figures(monkeypatch)
    done = report([tmp_path / "runs"], tmp_path / "out", plots=False)
    assert plot_pareto(done["groups"], tmp_path / "bytes.png", "every rate")
    for ax in figures["bytes.png"].axes:
        for container in ax.containers:
            _, caps, bars = container.lines
            assert not caps and not bars
    assert plot_overlay(done["groups"], tmp_path / "overlay.png", "every rate")
    (ax,) = figures["overlay.png"].axes
    assert "band" not in ax.get_title()
    assert ax.get_legend().handlelength >= 4  # long enough to show the dash patterns


def test_bands_are_t_intervals_from_three_seeds_and_ranges_below():
    from fedsim.report.stats import band, band_name

    mean, low, high = band([0.5, 0.9])  # two seeds: their range, not a t interval
    assert (mean, low, high) == (pytest.approx(0.7), 0.5, 0.9)
    xs = [0.8, 0.9, 1.0]  # sd 0.1: 0.9 -/+ 4.303 * 0.1 / sqrt(3), clipped to [0, 1]
    mean, low, high = band(xs)
    assert low == pytest.approx(0.9 - 4.302652729911275 * 0.1 / 3**0.5) and high == 1.0
    assert band([0.4]) == (0.4, 0.4, 0.4)
    assert (band_name(1), band_name(2), band_name(3)) == ("", "2 seeds, min-max", "3 seeds, 95% CI")


def test_one_seed_is_not_called_a_mean_over_seeds(tmp_path, monkeypatch):
    from fedsim.report import report

    for job, strategy in enumerate(["fedavg", "fedsb"]):
        write_run(tmp_path / "one" / str(job), strategy, acc=0.5 + job / 10)
        for seed in (0, 1, 2):
            write_run(tmp_path / "three" / f"{job}{seed}", strategy, seed=seed, acc=0.5)
    figures = _figures(monkeypatch)
    report([tmp_path / "one"], tmp_path / "out1")
    title = figures["accuracy_by_round.png"].get_suptitle()
    assert "seeds" not in title and "mean" not in title
    assert "one seed" in figures["accuracy_vs_bytes.png"].axes[0].get_ylabel()
    report([tmp_path / "three"], tmp_path / "out3")
    assert figures["accuracy_by_round.png"].get_suptitle().endswith("(mean over seeds)")


def test_points_that_would_hide_each_other_are_set_apart(tmp_path, monkeypatch):
    from fedsim.report import report

    for job, strategy in enumerate(["fedavg", "plugin", "fedsb"]):
        up = 1_000_000 if strategy != "fedsb" else 300_000
        write_run(tmp_path / "runs" / str(job), strategy, acc=0.6, up=up, down=up)
    figures = _figures(monkeypatch)
    report([tmp_path / "runs"], tmp_path / "out")
    cost = figures["accuracy_vs_bytes.png"].axes[0]
    drawn = {}
    for bars in cost.containers:  # each strategy's error bar, where it is drawn
        line = bars.lines[0]
        drawn[bars.get_label()] = line.get_transform().transform(line.get_xydata())[0]
    assert set(drawn) == {"fedavg", "plugin", "fedsb"}
    apart = abs(drawn["fedavg"][0] - drawn["plugin"][0])  # same bytes, same accuracy
    assert apart > 5 and drawn["fedavg"][1] == pytest.approx(drawn["plugin"][1])
    assert "2 points at the same cost drawn side by side" in cost.get_xlabel()


def test_the_figure_title_clears_the_legend_above_a_panel(tmp_path, monkeypatch):
    """accuracy_vs_bytes sets its legend (with a title line) above the cost panel; the figure's
    title goes above it rather than through it, also when the side-by-side panel's long
    upright names leave tight_layout no room (seen with seven sentiment configurations)."""
    from fedsim.report import report
    from fedsim.report.figures import overlaps

    figures = _figures(monkeypatch)
    root = tmp_path / "runs"
    for i in range(7):
        extra = [f"sim.a_long_setting_name_{k}=value_{i}" for k in range(4)]
        strategy = "fedsb" if i == 6 else "fedavg"
        lr = 0.001 if i % 2 else 0.01  # rates swept: the title names the choice, a long line
        write_run(root / str(i), strategy, lr, 0, 0.5 + i / 20, val=0.5,
                  up=66_500_000 // (i + 1), extra=extra)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report([root], tmp_path / "out")
    assert overlaps(figures["accuracy_vs_bytes.png"]) == []
    assert not [w for w in caught if "layout" in str(w.message)]  # handled, so not shown
