"""Per-token pictures of credit statistics (WAAD, FAI, γ, ...) over one response.

Why a picture: the credit methods' token sets (preplan, anchor, intro, dominated) are easy to
get subtly wrong — an off-by-one alignment or a statistic that is flat over the response is
obvious when each token is coloured by its value, and invisible in share metrics.

Two outputs of the same picture, both free of torch (plain lists in, text or a file out):

* `credit_html` — an HTML fragment (inline styles, no external assets) usable as a W&B
  `wandb.Html` cell; `credit_page` wraps fragments into a standalone document.
* `credit_png` — a matplotlib figure, one panel per statistic, for places without a browser.

Colours are normalised per statistic over the given tokens (min → white, max → that
statistic's hue); a statistic constant over the response is drawn all white, since it
carries no information. Tooltips (HTML) hold the exact value.
"""
from __future__ import annotations

import html
import math
from typing import Iterable, Sequence

# One hue per statistic, in the order given (dark enough that white text stays readable).
STAT_COLOURS = ["#1f5fa8", "#d2561a", "#6a3d9a", "#1a8a5a", "#a8326e", "#7a6a10"]
# One colour per mark (drawn as stacked underlines), distinct from the statistic hues.
MARK_COLOURS = ["#00b050", "#e41a1c", "#111111", "#f2b600", "#00b7d4", "#ff66cc"]
WRAP = 60  # PNG: cells per line before wrapping


def display_token(tok: str) -> str:
    """The token with whitespace made visible (newline ⏎, space ·, tab ⇥; empty ∅)."""
    if tok == "":
        return "∅"
    return tok.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")


def _normalise(vals: Sequence[float]) -> list[float]:
    """Each value's position in [0, 1] between the finite min and max (0 when constant; NaN kept)."""
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return [float("nan")] * len(vals)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    return [float("nan") if not math.isfinite(v) else (0.0 if span <= 0 else (v - lo) / span)
            for v in vals]


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def _mix(hex_colour: str, t: float) -> tuple[int, int, int]:
    """White at t = 0, the full colour at t = 1."""
    r, g, b = _rgb(hex_colour)
    return tuple(round(255 + t * (c - 255)) for c in (r, g, b))


def _text_colour(rgb: tuple[int, int, int]) -> str:
    lum = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]) / 255
    return "#000" if lum > 0.55 else "#fff"


def _fmt(v: float) -> str:
    """The exact value (shortest round-trip repr), so tooltips can be compared with logs."""
    return repr(float(v))


def _check(tokens: Sequence[str], values: dict, marks: dict | None) -> dict:
    n = len(tokens)
    for name, vals in values.items():
        if len(vals) != n:
            raise ValueError(f"statistic {name!r} has {len(vals)} values for {n} tokens")
    marks = dict(marks or {})
    for name, m in marks.items():
        if len(m) != n:
            raise ValueError(f"mark {name!r} has {len(m)} flags for {n} tokens")
    return marks


# --- HTML ------------------------------------------------------------------------------------

_BOX = ("font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.9;"
        "background:#fff;color:#000;")
_TOK = ("display:inline-block;min-width:0.6em;text-align:center;padding:0 2px;margin:0 1px 2px 0;"
        "border-radius:2px;line-height:1.5;")


def _mark_shadow(active: list[int]) -> str:
    """Stacked 3-px underlines, one per active mark (inset box-shadows add up, borders don't);
    the span's bottom padding (3 px per mark) keeps them below the glyph."""
    if not active:
        return ""
    shadows = [f"inset 0 -{3 * (k + 1)}px 0 {MARK_COLOURS[i % len(MARK_COLOURS)]}"
               for k, i in enumerate(active)]
    return "box-shadow:" + ",".join(shadows) + ";"


def _mark_legend(marks: dict) -> str:
    items = []
    for i, (name, flags) in enumerate(marks.items()):
        c = MARK_COLOURS[i % len(MARK_COLOURS)]
        items.append(f'<span style="display:inline-block;margin-right:14px">'
                     f'<span style="display:inline-block;width:18px;height:0;border-bottom:3px solid {c};'
                     f'vertical-align:middle;margin-right:4px"></span>{html.escape(name)} '
                     f'({sum(bool(f) for f in flags)})</span>')
    return f'<div style="margin:4px 0;font-size:12px">marks: {"".join(items)}</div>'


def _stat_block(name: str, colour: str, tokens: Sequence[str], vals: Sequence[float],
                marks: dict) -> str:
    finite = [v for v in vals if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (float("nan"), float("nan"))
    ramp = f"linear-gradient(to right,#fff,{colour})"
    head = (f'<div style="margin:10px 0 2px 0"><b>{html.escape(name)}</b> '
            f'<span style="font-size:12px">min {lo:.4g} '
            f'<span style="display:inline-block;width:80px;height:10px;background:{ramp};'
            f'border:1px solid #999;vertical-align:middle"></span> max {hi:.4g}</span></div>')
    mark_items = list(marks.items())
    spans = []
    for j, (tok, v, t) in enumerate(zip(tokens, vals, _normalise(vals))):
        if math.isnan(t):
            bg, fg = (221, 221, 221), "#000"
        else:
            bg = _mix(colour, t)
            fg = _text_colour(bg)
        active = [i for i, (_, flags) in enumerate(mark_items) if flags[j]]
        tip = f"#{j} {tok!r}\n{name} = {_fmt(v)}"
        if active:
            tip += "\n" + ", ".join(mark_items[i][0] for i in active)
        style = (f"{_TOK}padding-bottom:{3 * len(mark_items)}px;background:rgb{bg};color:{fg};"
                 f"{_mark_shadow(active)}")
        spans.append(f'<span class="cr-tok" style="{style}" title="{html.escape(tip, quote=True)}">'
                     f'{html.escape(display_token(tok))}</span>')
        if "\n" in tok:
            spans.append("<br>")
    body = f'<div style="white-space:normal;word-break:break-all">{"".join(spans)}</div>'
    return f'<div class="cr-stat" data-stat="{html.escape(name, quote=True)}">{head}{body}</div>'


def credit_html(tokens: list[str], values: dict[str, list[float]], title: str = "",
                marks: dict[str, list[bool]] | None = None) -> str:
    """The response once per statistic, each token coloured by its value, as an HTML fragment.

    `values` maps a statistic's name (e.g. "WAAD", "FAI", "γ") to one value per token; `marks`
    maps a token set's name (e.g. "preplan", "anchor") to one flag per token, drawn as an
    underline on every view with a legend. Hover a token for its index, text, exact value."""
    marks = _check(tokens, values, marks)
    parts = [f'<div class="cr-credit" style="{_BOX}padding:6px">']
    if title:
        parts.append(f'<div style="font-weight:bold;font-size:14px">{html.escape(title)}</div>')
    if marks:
        parts.append(_mark_legend(marks))
    for i, (name, vals) in enumerate(values.items()):
        parts.append(_stat_block(name, STAT_COLOURS[i % len(STAT_COLOURS)], tokens,
                                 [float(v) for v in vals], marks))
    parts.append("</div>")
    return "".join(parts)


def text_html(label: str, text: str) -> str:
    """A labelled preformatted block (prompt, response) with the text escaped."""
    return (f'<div style="margin:8px 0"><b>{html.escape(label)}</b>'
            f'<pre style="background:#f6f6f6;padding:6px;margin:2px 0;white-space:pre-wrap">'
            f'{html.escape(text)}</pre></div>')


def table_html(label: str, rows: dict[str, object]) -> str:
    """A labelled two-column table (parameters, head groups)."""
    cells = "".join(f'<tr><td style="padding:1px 10px 1px 0;vertical-align:top"><code>{html.escape(str(k))}</code></td>'
                    f'<td style="padding:1px 0">{html.escape(str(v))}</td></tr>' for k, v in rows.items())
    return (f'<div style="margin:8px 0"><b>{html.escape(label)}</b>'
            f'<table style="border-collapse:collapse;font-size:13px">{cells}</table></div>')


def credit_page(sections: Iterable[str], title: str) -> str:
    """A standalone HTML document around fragments from `credit_html` / `text_html` / ..."""
    t = html.escape(title)
    body = "\n".join(sections)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{t}</title></head>\n"
            "<body style=\"font-family:system-ui,sans-serif;max-width:1100px;margin:16px auto;"
            f"background:#fff;color:#000\">\n<h2>{t}</h2>\n{body}\n</body></html>\n")


# --- PNG -------------------------------------------------------------------------------------

_CELL_W, _CELL_H = 0.2, 0.34  # inches per cell unit / per line
_CHAR_UNITS = 0.34            # width of one 8-pt monospaced character, in cell units


def _cell_width(tok: str) -> float:
    """Cells widen for multi-character tokens (special tokens, BPE pieces) so the text fits."""
    return max(1.0, _CHAR_UNITS * len(display_token(tok)) + 0.35)


def _layout(tokens: Sequence[str], wrap: float) -> list[tuple[int, float, float]]:
    """(line, x, width) of each cell: a new line after a newline token or past `wrap` units."""
    cells, line, x = [], 0, 0.0
    for tok in tokens:
        w = _cell_width(tok)
        if x > 0 and x + w > wrap:
            line, x = line + 1, 0.0
        cells.append((line, x, w))
        x += w
        if "\n" in tok:
            line, x = line + 1, 0.0
    return cells


def credit_png(tokens: list[str], values: dict[str, list[float]], path, title: str = "",
               marks: dict[str, list[bool]] | None = None) -> None:
    """The `credit_html` picture as a PNG: one panel per statistic, one cell per token, the
    statistic's min/max on a colourbar beside it and the marks as underlines with a legend.

    Draws on a bare `Figure` with the Agg canvas rather than switching pyplot's backend, so
    it works headless and never changes the backend of a caller that uses pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    marks = _check(tokens, values, marks)
    mark_items = list(marks.items())
    cells = _layout(tokens, WRAP)
    n_lines = (cells[-1][0] + 1) if cells else 1
    units = max(12.0, max((x + w for _, x, w in cells), default=0.0))
    left, head, gap, cbar = 0.15, 0.3, 0.25, 0.9  # inches
    top = 0.4 if title else 0.1
    bottom = 0.4 if mark_items else 0.1
    panel = head + n_lines * _CELL_H + gap
    fig_w = max(8.0, left + units * _CELL_W + cbar)  # room for the title and the legend
    fig_h = top + len(values) * panel + bottom
    fig = Figure(figsize=(fig_w, fig_h))
    FigureCanvasAgg(fig)
    for i, (name, vals) in enumerate(values.items()):
        colour = STAT_COLOURS[i % len(STAT_COLOURS)]
        cmap = LinearSegmentedColormap.from_list(f"white_{i}", ["#ffffff", colour])
        vals = [float(v) for v in vals]
        finite = [v for v in vals if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
        y0 = fig_h - top - (i + 1) * panel + gap  # panel bottom, inches
        h = n_lines * _CELL_H
        ax = fig.add_axes((left / fig_w, y0 / fig_h, units * _CELL_W / fig_w, h / fig_h))
        for j, ((line, x, w), tok, t) in enumerate(zip(cells, tokens, _normalise(vals))):
            face = (0.87, 0.87, 0.87, 1.0) if math.isnan(t) else cmap(t)
            ax.add_patch(Rectangle((x, line), w, 1, facecolor=face, edgecolor="#bbbbbb", linewidth=0.4))
            rgb = tuple(round(255 * c) for c in face[:3])
            ax.text(x + w / 2, line + 0.42, display_token(tok), ha="center", va="center",
                    fontsize=8, family="DejaVu Sans Mono", color=_text_colour(rgb))
            active = [m for m, (_, flags) in enumerate(mark_items) if flags[j]]
            for k, m in enumerate(active):
                y = line + 0.92 - 0.11 * k
                ax.plot([x + 0.08, x + w - 0.08], [y, y], color=MARK_COLOURS[m % len(MARK_COLOURS)],
                        linewidth=1.6, solid_capstyle="butt")
        ax.set_xlim(0, units)
        ax.set_ylim(n_lines, 0)
        ax.set_axis_off()
        ax.set_title(f"{name}   min {lo:.4g}   max {hi:.4g}", loc="left", fontsize=9, pad=3)
        cax = fig.add_axes(((left + units * _CELL_W + 0.12) / fig_w, y0 / fig_h, 0.12 / fig_w, h / fig_h))
        sm = ScalarMappable(norm=Normalize(lo, hi if hi > lo else lo + 1e-12), cmap=cmap)
        cb = fig.colorbar(sm, cax=cax)
        cb.set_ticks([lo, hi] if hi > lo else [lo])
        cb.ax.tick_params(labelsize=7)
        cb.ax.yaxis.set_major_formatter(lambda v, _: f"{v:.3g}")
    if mark_items:
        handles = [Line2D([], [], color=MARK_COLOURS[m % len(MARK_COLOURS)], linewidth=2.5,
                          label=f"{name} ({sum(bool(f) for f in flags)})")
                   for m, (name, flags) in enumerate(mark_items)]
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(left / fig_w, 0.05 / fig_h),
                   ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.text(left / fig_w, 1 - 0.12 / fig_h, title, ha="left", va="top", fontsize=10)
    fig.savefig(path, dpi=110, facecolor="white")


def log_credit_table(tracker, tok, batch, trace, n: int, step: int) -> None:
    """A few responses coloured token by token by WAAD, FAI and γ (`credit_samples`); `trace`:
    the credit method's last trace (None: it keeps none)."""
    if trace is None or tracker.run is None or n <= 0:
        return
    rows = []
    for i in range(min(n, len(batch))):
        pos = batch.response_mask[i].nonzero()[:, 0]
        tokens = [tok.decode([t]) for t in batch.input_ids[i, pos].tolist()]
        values = {"γ": trace.gamma[i, pos].tolist()}
        marks = {"selected": trace.selected[i, pos].tolist()}
        if trace.sets is not None:
            values = {"WAAD": trace.sets.waad[i, pos].tolist(), "FAI": trace.sets.fai[i, pos].tolist(), **values}
            marks = {"preplan": trace.sets.preplan[i, pos].tolist(),
                     "anchor": trace.sets.anchor[i, pos].tolist(),
                     "intro": trace.sets.intro[i, pos].tolist()}
        rows.append([step, float(batch.rewards[i]), float(batch.seq_advantages[i]),
                     credit_html(tokens, values, marks=marks)])
    tracker.table("credit_samples", ["step", "reward", "advantage", "credit"], rows, step,
                  html_columns=("credit",))
