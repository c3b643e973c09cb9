"""Drawing: captioned panels, colour legends, panel grids, heat maps and bar charts, with pillow alone.

Nothing of the paper is here: the caller computes the tensors (il2vseg.explain_stages, evaluate.py) and
colours them (results.colourise); this file lays the uint8 (H, W, 3) panels out, writes a caption over
each, a legend under them, and saves the PNG atomically (checkpoints.write_atomic).
"""
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import checkpoints

CAPTION_H = 16   # pixels of the white strip over each panel
GAP = 4          # white pixels between panels
SWATCH = 10      # side of a legend's colour square


def font():
    """pillow's own font (no file, no new dependency)."""
    return ImageFont.load_default()


def text_width(text):
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font())[2]


def fit(text, width):
    """`text`, cut with '..' until it fits `width` pixels."""
    if text_width(text) <= width - 4:
        return text
    while text and text_width(text + "..") > width - 4:
        text = text[:-1]
    return text + ".." if text else ""


def captioned(panel, caption):
    """panel uint8 (H, W, 3) -> (CAPTION_H + H, W, 3): `caption` in black on a white strip above it."""
    strip = Image.new("RGB", (panel.shape[1], CAPTION_H), "white")
    ImageDraw.Draw(strip).text((2, 2), fit(caption, panel.shape[1]), fill="black", font=font())
    return np.concatenate([np.asarray(strip), panel], axis=0)


def legend(entries, width):
    """A colour legend (h, width, 3): one square and name per entry [(name, (r, g, b))], wrapped into rows."""
    rows, row, used = [], [], 0
    for name, colour in entries:
        item = SWATCH + 4 + text_width(name) + 10
        if row and used + item > width:
            rows.append(row)
            row, used = [], 0
        row.append((name, colour))
        used += item
    rows += [row] if row else []
    picture = Image.new("RGB", (width, 4 + 14 * len(rows)), "white")
    draw = ImageDraw.Draw(picture)
    for r, row in enumerate(rows):
        x, y = 2, 4 + 14 * r
        for name, colour in row:
            draw.rectangle([x, y, x + SWATCH - 1, y + SWATCH - 1], fill=tuple(int(c) for c in colour), outline="gray")
            draw.text((x + SWATCH + 3, y - 1), name, fill="black", font=font())
            x += SWATCH + 4 + text_width(name) + 10
    return np.asarray(picture)


def legend_entries(names, colours, void=None):
    """[(name, colour)] for class (or cluster) names and their palette colours (n, 3); `void` names black."""
    entries = [(str(name), tuple(int(c) for c in colour)) for name, colour in zip(names, colours)]
    return entries + ([(void, (0, 0, 0))] if void else [])


def grid(panels, columns=None, entries=None, title=None):
    """uint8 picture of captioned panels [(panel (H, W, 3), caption)] in rows of `columns` (default: one
    row), white gaps of GAP, then the legend of `entries` and a `title` line over everything (optional).
    Every panel of one grid has the same size."""
    columns = columns or len(panels)
    height, width = panels[0][0].shape[:2]
    cell_h, cell_w = CAPTION_H + height, width
    n_rows = -(-len(panels) // columns)
    total_w = columns * cell_w + (columns - 1) * GAP
    canvas = np.full((n_rows * cell_h + (n_rows - 1) * GAP, total_w, 3), 255, dtype=np.uint8)
    for index, (panel, caption) in enumerate(panels):
        r, c = divmod(index, columns)
        top, left = r * (cell_h + GAP), c * (cell_w + GAP)
        canvas[top:top + cell_h, left:left + cell_w] = captioned(panel, caption)
    parts = [canvas] + ([legend(entries, total_w)] if entries else [])
    if title:
        parts.insert(0, captioned(np.zeros((0, total_w, 3), np.uint8), title))
    return np.concatenate(parts, axis=0)


def panel_origin(index, height, width, columns, title=False):
    """(top, left) of panel `index`'s image (below its caption) in a `grid` of (height, width) panels."""
    r, c = divmod(index, columns)
    return (CAPTION_H if title else 0) + r * (CAPTION_H + height + GAP) + CAPTION_H, c * (width + GAP)


def enlarge(panel, height, width):
    """A panel (h, w, 3) shown at (height, width) by nearest-neighbour (each grid cell a visible block)."""
    return np.asarray(Image.fromarray(panel).resize((width, height), Image.NEAREST))


def heat(values, low=None, high=None):
    """A heat map uint8 (H, W, 3) of values (H, W): black -> red -> yellow -> white from low to high
    (their min and max by default)."""
    values = np.asarray(values, dtype=np.float64)
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    t = np.clip((values - low) / max(high - low, 1e-12), 0, 1)[..., None]  # (H, W, 1)
    ramp = np.concatenate([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return (ramp * 255).round().astype(np.uint8)


def mark(panel, row, col, colour=(0, 255, 255)):
    """A copy of panel with a small cross at (row, col)."""
    panel = panel.copy()
    panel[row, max(0, col - 3):col + 4] = colour
    panel[max(0, row - 3):row + 4, col] = colour
    return panel


SERIES_COLOURS = [(70, 110, 190), (230, 140, 40), (60, 160, 90), (190, 60, 60)]
CHART_LEFT, CHART_TOP, CHART_HEIGHT, BAR_W = 40, 36, 240, 18


def bar_chart(title, groups, series, ylabel="%"):
    """uint8 picture of a grouped bar chart: groups [(name, [value or None per series])], series names;
    values in percent (0..100), written over each bar, no bar for None. Axis, ticks, title, legend."""
    left, top, height = CHART_LEFT, CHART_TOP, CHART_HEIGHT
    group_w = len(series) * BAR_W + 16
    width = max(left + len(groups) * group_w + 10, left + text_width(title) + 10)
    picture = Image.new("RGB", (width, top + height + 40), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((left, 4), title, fill="black", font=font())
    y0 = top + height  # the axis line (value 0)
    for tick in range(0, 101, 20):
        y = y0 - tick * height / 100
        draw.line([left - 3, y, width - 5, y], fill=(225, 225, 225) if tick else "black")
        draw.text((left - 6 - text_width(str(tick)), y - 6), str(tick), fill="black", font=font())
    draw.line([left, top, left, y0], fill="black")
    draw.text((4, top - 16), ylabel, fill="black", font=font())
    for g, (name, values) in enumerate(groups):
        x = left + 8 + g * group_w
        for s, value in enumerate(values):
            if value is None:
                continue
            x0, y, x1, _ = bar_geometry(len(series), g, s, value)
            if y < y0:  # a 0 % bar is its label alone
                draw.rectangle([x0, y, x1, y0 - 1], fill=SERIES_COLOURS[s % len(SERIES_COLOURS)])
            label = f"{value:.0f}"
            draw.text((x0 + (BAR_W - 2 - text_width(label)) // 2, y - 13), label, fill="black", font=font())
        shown = fit(name, group_w + 8)
        draw.text((x + (len(series) * BAR_W - text_width(shown)) // 2, y0 + 4), shown, fill="black", font=font())
    x = left
    for s, name in enumerate(series):
        draw.rectangle([x, y0 + 22, x + SWATCH - 1, y0 + 22 + SWATCH - 1], fill=SERIES_COLOURS[s % len(SERIES_COLOURS)])
        draw.text((x + SWATCH + 3, y0 + 21), name, fill="black", font=font())
        x += SWATCH + 16 + text_width(name)
    return np.asarray(picture)


def bar_geometry(n_series, group, index, value):
    """(x0, y_top, x1, y_axis) of the bar of series `index` in group `group` of `bar_chart` at `value` %."""
    x0 = CHART_LEFT + 8 + group * (n_series * BAR_W + 16) + index * BAR_W
    y0 = CHART_TOP + CHART_HEIGHT
    return x0 + 1, round(y0 - max(0.0, min(value, 100.0)) * CHART_HEIGHT / 100), x0 + BAR_W - 2, y0


def ablation_chart(title, rows):
    """The bar chart of an ablation's table: one group per setting, one bar per probe's mIoU before and
    after the CRF (the after-CRF bars only when the CRF ran). rows: [(setting, evaluate's "probes")]."""
    probes = list(rows[0][1])
    stages = [("before_crf", "")] + ([("after_crf", " +CRF")] if any(
        entries[p]["after_crf"] for _, entries in rows for p in probes) else [])
    series = [f"{p} mIoU{suffix}" for p in probes for _, suffix in stages]

    def percent(entry):
        value = entry["miou"] if entry else None
        return None if value is None or value != value else 100 * value  # nan: no bar
    groups = [(name, [percent(entries[p][stage]) for p in probes for stage, _ in stages]) for name, entries in rows]
    return bar_chart(title, groups, series, ylabel="mIoU %")


def save_png(path, picture):
    """Write uint8 (H, W, 3) as a PNG through checkpoints.write_atomic; returns the path."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG")
    checkpoints.write_atomic(path, buffer.getvalue())
    return path
