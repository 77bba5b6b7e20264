"""Plotly figures for the pages. Inputs are the engine's tables and the job store's values."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from iet_core.history import RatioSnapshot, ratio_bin_centres

COLORS = ["#4f46e5", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"]
LOG_AXIS = dict(type="log", dtick=1, minor=dict(showgrid=True))  # labels at powers of ten only
# The legend goes under the plot: above it, long run names (with step and quality) ran into the title.
LAYOUT = dict(template="plotly_white", margin=dict(l=50, r=20, t=50, b=95), height=360,
              legend=dict(orientation="h", yanchor="top", y=-0.28, xanchor="left", x=0),
              font=dict(size=14))


def empty_figure(message: str, height: int = LAYOUT["height"]) -> go.Figure:
    figure = go.Figure()
    figure.add_annotation(text=message, showarrow=False, font=dict(size=16, color="#6b7280"),
                          xref="paper", yref="paper", x=0.5, y=0.5)
    figure.update_layout(**{**LAYOUT, "height": height}, xaxis=dict(visible=False), yaxis=dict(visible=False))
    return figure


def _smooth(values: pd.Series, points: int) -> pd.Series:
    return values.rolling(max(1, points // 50), min_periods=1, center=True).mean()


def _mark_settings(figure: go.Figure, settings: list[dict]) -> None:
    """A dashed line where lambda was changed during training, labelled with its new value."""
    for change in settings:
        figure.add_vline(x=change["global_step"], line=dict(color="#dc2626", dash="dash", width=1.5),
                         annotation_text=f"λ → {change['value']:.2f}", annotation_position="top left",
                         annotation_font_color="#dc2626")


def _mark_rounds(figure: go.Figure, rounds: list[dict]) -> None:
    for row in rounds[:-1] if len(rounds) > 30 else rounds:
        figure.add_vline(x=row["global_step"], line=dict(color="#d1d5db", width=1))


def loss_figure(steps: pd.DataFrame, settings: list[dict], rounds: list[dict]) -> go.Figure:
    if steps.empty:
        return empty_figure("The loss curve appears after the first logged steps.")
    figure = go.Figure()
    figure.add_scatter(x=steps["global_step"], y=steps["loss"], mode="lines", name="loss (kept samples)",
                       line=dict(color="#a5b4fc", width=1))
    figure.add_scatter(x=steps["global_step"], y=_smooth(steps["loss"], len(steps)), mode="lines", name="smoothed",
                       line=dict(color=COLORS[0], width=2.5))
    _mark_rounds(figure, rounds)
    _mark_settings(figure, settings)
    figure.update_layout(**LAYOUT, title="Training loss", xaxis_title="step (all proxies)", yaxis_title="loss",
                         yaxis=LOG_AXIS)
    return figure


def kept_figure(steps: pd.DataFrame, settings: list[dict], rounds: list[dict]) -> go.Figure:
    if steps.empty:
        return empty_figure("The kept/skipped split appears after the first logged steps.")
    kept = steps["kept_fraction"]
    figure = go.Figure()
    figure.add_scatter(x=steps["global_step"], y=_smooth(kept, len(steps)), mode="lines", name="kept",
                       stackgroup="one", line=dict(color=COLORS[2]))
    figure.add_scatter(x=steps["global_step"], y=1 - _smooth(kept, len(steps)), mode="lines", name="skipped by AGC",
                       stackgroup="one", line=dict(color=COLORS[3]))
    _mark_rounds(figure, rounds)
    _mark_settings(figure, settings)
    figure.update_layout(**LAYOUT, title="Kept vs skipped samples per step", xaxis_title="step (all proxies)",
                         yaxis_title="share of batch", yaxis_range=[0, 1])
    return figure


def ratio_histogram(current: RatioSnapshot | None, what_if: float, applied: float | None = None,
                    early: RatioSnapshot | None = None, title: str | None = None) -> go.Figure:
    """The window's loss ratios as shares of its visits, coloured at the what-if lambda: red
    where AGC skips them (the what-if is the lambda in force), amber where it would skip them
    at the what-if (or where a run without AGC would skip them). `applied`: the lambda in force,
    None for a run without AGC. Optionally the early window in grey. Ratios of 3 and more share
    the last bar, which is left out of the y range (early in training it dwarfs the rest)."""
    if current is None or current.visits == current.unseen:
        return empty_figure("The loss-ratio histogram appears once the memory bank has seen some timesteps.", 360)
    group = 5  # bars of 5 bins read better than the fine bins (the shares use the fine bins)
    centers = ratio_bin_centres(group)
    figure = go.Figure()

    def density(snapshot: RatioSnapshot) -> np.ndarray:
        counts = snapshot.counts.reshape(-1, group).sum(1)
        return counts / max(counts.sum(), 1)

    shown = [density(current)]
    if early is not None:
        shown.append(density(early))
        figure.add_bar(x=centers, y=shown[1], name=f"early (steps {early.first_step}–{early.last_step})",
                       marker_color="#9ca3af", opacity=0.55)
    below = centers < what_if
    in_force = applied is not None and abs(what_if - applied) < 1e-6
    below_name = ("skipped (ratio < λ)" if in_force else "would be skipped at the what-if λ" if applied is not None
                  else "would be skipped with AGC (this run skips nothing)")
    figure.add_bar(x=centers, y=np.where(below, 0, shown[0]), name="kept", marker_color=COLORS[0])
    figure.add_bar(x=centers, y=np.where(below, shown[0], 0), name=below_name,
                   marker_color=COLORS[3] if in_force else COLORS[1])
    top = max(float(d[:-1].max()) for d in shown) * 1.15 or 1.0
    figure.add_annotation(x=2.97, y=top * 0.97, text=f"≥ 3: {100 * shown[0][-1]:.0f}%", showarrow=False,
                          xanchor="right", font=dict(color="#6b7280"))
    if applied is not None:
        figure.add_vline(x=applied, line=dict(color="#dc2626", width=3),
                         annotation_text=f"λ = {applied:.2f}", annotation_position="top right")
    if not in_force:
        figure.add_vline(x=what_if, line=dict(color="#d97706", width=3, dash="dot"),
                         annotation_text=f"what-if {what_if:.2f}", annotation_position="bottom right")
    title = title or f"Loss ratio loss / bank[t] · steps {current.first_step}–{current.last_step}"
    figure.update_layout(**{**LAYOUT, "height": 380}, barmode="overlay", bargap=0.02, title=title,
                         xaxis_title="loss / bank[t]   (left of λ: too easy, skipped)",
                         yaxis_title="share of visits", xaxis_range=[0, 3], yaxis_range=[0, top])
    return figure


def shard_progress(proxies: dict[int, dict], num_shards: int, round_: int, steps_per_proxy: list[int] | None) -> go.Figure:
    """One bar per proxy: its local steps done in the current round."""
    done = []
    for k in range(num_shards):
        p = proxies.get(k)
        done.append(p["local_step"] + 1 if p and p["round"] == round_ else 0)
    totals = steps_per_proxy or [max(done) or 1] * num_shards
    share = [min(d / max(t, 1), 1.0) for d, t in zip(done, totals)]
    figure = go.Figure(go.Bar(y=[f"shard {k}" for k in range(num_shards)], x=share, orientation="h",
                              text=[f"{d}/{t} steps" for d, t in zip(done, totals)], textposition="auto",
                              marker_color=[COLORS[k % len(COLORS)] for k in range(num_shards)]))
    figure.update_layout(**{**LAYOUT, "height": 80 + 34 * num_shards}, title=f"Proxies in round {round_ + 1}",
                         xaxis=dict(range=[0, 1], tickformat=".0%"), yaxis=dict(autorange="reversed"), showlegend=False)
    return figure


def drift_figure(drift: pd.DataFrame) -> go.Figure:
    """Whether IET's averaging has anything to average, round by round (means over proxies):
    how far the proxies moved from the round's start and from each other (as % of the weights'
    norm), and their probe loss on their own shard against the other shards and the average's."""
    if drift.empty:
        return empty_figure("Proxy drift appears after the first round.")
    from plotly.subplots import make_subplots

    rounds = drift.groupby("round").mean(numeric_only=True).reset_index()
    x = rounds["round"] + 1
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Weights moved (% of |w|)", "Probe loss"))
    for i, (column, name) in enumerate([("drift", "from the round's start"), ("distance_to_others", "from the other proxies")]):
        if rounds[column].notna().any():
            figure.add_scatter(x=x, y=100 * rounds[column] / rounds["start_norm"], mode="lines+markers", name=name,
                               line=dict(color=COLORS[i]), row=1, col=1)
    for i, (column, name) in enumerate([("loss_own", "own shard"), ("loss_others", "other shards"),
                                        ("average_loss_own", "averaged model")]):
        if rounds[column].notna().any():
            figure.add_scatter(x=x, y=rounds[column], mode="lines+markers", name=name,
                               line=dict(color=COLORS[2 + i]), row=1, col=2)
    figure.update_layout(**LAYOUT, title="Proxy drift per round")
    figure.update_xaxes(title_text="round")
    return figure


def memorization_histogram(ratios: np.ndarray, threshold: float, title: str = "Nearest / second-nearest distance") -> go.Figure:
    if not len(ratios):
        return empty_figure("Evaluate a run to see how close its samples are to training images.")
    figure = go.Figure()
    figure.add_histogram(x=np.clip(ratios, 0, 1), xbins=dict(start=0, end=1.0001, size=0.025), marker_color=COLORS[0],
                         name="samples")
    figure.add_vline(x=threshold, line=dict(color="#dc2626", width=3),
                     annotation_text=f"copies ← {threshold:.2f}", annotation_position="top left")
    figure.update_layout(**LAYOUT, title=title, xaxis_title="d(sample, nearest) / d(sample, 2nd nearest)",
                         yaxis_title="samples", xaxis_range=[0, 1], showlegend=False)
    return figure


def overlay_lines(series: dict[str, pd.DataFrame], x: str, y: str, title: str, y_title: str, smooth: bool = True,
                  log_y: bool = False) -> go.Figure:
    """One line per run."""
    if not any(len(frame) for frame in series.values()):
        return empty_figure("Pick runs with logged steps.")
    figure = go.Figure()
    for i, (name, frame) in enumerate(series.items()):
        if len(frame):
            values = _smooth(frame[y], len(frame)) if smooth else frame[y]
            figure.add_scatter(x=frame[x], y=values, mode="lines", name=name, line=dict(color=COLORS[i % len(COLORS)], width=2))
    figure.update_layout(**LAYOUT, title=title, xaxis_title=x.replace("_", " "), yaxis_title=y_title,
                         yaxis=LOG_AXIS if log_y else {})
    return figure


def overlay_histograms(series: dict[str, np.ndarray], title: str, x_title: str, x_range: tuple[float, float],
                       bin_size: float, line: float | None = None) -> go.Figure:
    """Normalized histograms of values per run, overlaid."""
    if not any(len(v) for v in series.values()):
        return empty_figure("Nothing to compare yet.")
    figure = go.Figure()
    for i, (name, values) in enumerate(series.items()):
        if len(values):
            figure.add_histogram(x=np.clip(values, *x_range), name=name, histnorm="probability", opacity=0.6,
                                 xbins=dict(start=x_range[0], end=x_range[1] + 1e-9, size=bin_size),
                                 marker_color=COLORS[i % len(COLORS)])
    if line is not None:
        figure.add_vline(x=line, line=dict(color="#dc2626", width=2.5))
    figure.update_layout(**LAYOUT, barmode="overlay", title=title, xaxis_title=x_title, yaxis_title="share",
                         xaxis_range=list(x_range))
    return figure

