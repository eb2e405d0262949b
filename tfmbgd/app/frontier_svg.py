"""The critical-batch probe's picture as SVG text: no plotting library needed.

Log-log axes, examples to the target (x) against steps to the target (y): one point per
batch size (its best learning rate), the fitted frontier `(S/S_min - 1)(E/E_min - 1) = 1`
with its asymptotes S_min and E_min, and the rays `S = E / B` of B_crit, B_simple and
B_noise (a batch size is a line of slope 1 here).
"""

import math

WIDTH, HEIGHT = 760, 440
LEFT, RIGHT, TOP, BOTTOM = 70, 250, 40, 60
COLORS = {"B_crit": "#d62728", "B_simple": "#2ca02c", "B_noise": "#9467bd"}


def draw(result):
    """The SVG document of a `tfmbgd.app.critical.CriticalBatch`."""
    points = [(b.examples, b.steps, size) for size, b in result.best.items() if b is not None]
    if not points:
        return _svg(['<text x="20" y="40">no batch size reached the target</text>'])
    es = [p[0] for p in points]
    ss = [p[1] for p in points]
    x_lo, x_hi = _decades(min(es) / 2, max(es) * 2)
    y_lo, y_hi = _decades(max(min(ss) / 2, 0.5), max(ss) * 2)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(e):
        return LEFT + plot_w * (math.log10(e) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))

    def py(s):
        return TOP + plot_h * (1 - (math.log10(s) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo)))

    out = [f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>']
    for exp in range(round(math.log10(x_lo)), round(math.log10(x_hi)) + 1):
        x = px(10 ** exp)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#ddd"/>')
        out.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">1e{exp}</text>')
    for exp in range(round(math.log10(y_lo)), round(math.log10(y_hi)) + 1):
        y = py(10 ** exp)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">1e{exp}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 15}" text-anchor="middle">examples to the target '
               f'loss {result.target_loss:.3g} (E)</text>')
    out.append(f'<text transform="translate(18 {TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               'steps to the target (S)</text>')
    clip = 'clip-path="url(#plot)"'
    out.append(f'<clipPath id="plot"><rect x="{LEFT}" y="{TOP}" width="{plot_w}" '
               f'height="{plot_h}"/></clipPath>')
    f = result.frontier
    if f is not None and f.bounded:
        grid = [f.e_min * (1 + 10 ** (k / 40)) for k in range(-160, 161)]
        path = " ".join(f"{'M' if i == 0 else 'L'}{px(e):.1f},{py(f.steps_for_examples(e)):.1f}"
                        for i, e in enumerate(grid) if x_lo <= e <= x_hi)
        out.append(f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="2" {clip}/>')
        out.append(f'<line x1="{LEFT}" y1="{py(f.s_min):.1f}" x2="{LEFT + plot_w}" y2="{py(f.s_min):.1f}" '
                   f'stroke="#1f77b4" stroke-dasharray="2,3" {clip}/>')
        out.append(f'<line x1="{px(f.e_min):.1f}" y1="{TOP}" x2="{px(f.e_min):.1f}" y2="{TOP + plot_h}" '
                   f'stroke="#1f77b4" stroke-dasharray="2,3" {clip}/>')
        out.append(_legend(0, "#1f77b4", f"frontier (S_min {f.s_min:.3g}, E_min {f.e_min:.3g})"))
    row = 1
    scales = (("B_crit", result.b_crit), ("B_simple", result.b_simple), ("B_noise", result.b_noise))
    for name, value in scales:
        if value is None or not math.isfinite(value) or value <= 0:
            continue
        # the ray S = E / B across the plot: from E = x_lo to E = x_hi
        out.append(f'<line x1="{px(x_lo):.1f}" y1="{py(x_lo / value):.1f}" x2="{px(x_hi):.1f}" '
                   f'y2="{py(x_hi / value):.1f}" stroke="{COLORS[name]}" stroke-dasharray="6,4" {clip}/>')
        out.append(_legend(row, COLORS[name], f"{name} = {value:.3g}"))
        row += 1
    for e, s, size in points:
        out.append(f'<circle cx="{px(e):.1f}" cy="{py(s):.1f}" r="4" fill="#000"/>')
        out.append(f'<text x="{px(e) + 6:.1f}" y="{py(s) - 6:.1f}" font-size="11">B={size}</text>')
    return _svg(out)


def _legend(row, color, text):
    x, y = WIDTH - RIGHT + 8, TOP + 14 + 18 * row
    return (f'<line x1="{x}" y1="{y - 4}" x2="{x + 18}" y2="{y - 4}" stroke="{color}" stroke-width="2"/>'
            f'<text x="{x + 22}" y="{y}" font-size="11">{text}</text>')


def _decades(lo, hi):
    return 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))


def _svg(body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'font-family="sans-serif" font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
