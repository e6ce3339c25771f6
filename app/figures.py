"""Plotly figures for the app: page-selection heatmaps and the per-step time sparkline."""
import numpy as np
import plotly.graph_objects as go

READ, SELECTED, CURRENT = 0.35, 1.0, 0.7  # cell values: read by a dense layer, selected, the current page
COLORS = [[0, "#f4f4f5"], [READ, "#bfdbfe"], [CURRENT, "#f59e0b"], [1, "#1d4ed8"]]


def _layout(figure, title, height):
    figure.update_layout(title=dict(text=title, font=dict(size=13)), height=height, margin=dict(l=50, r=10, t=36, b=36),
                         plot_bgcolor="white", uirevision="keep")  # uirevision: no zoom reset on refresh
    return figure


def _page_cells(selected_row, num_pages, dense):
    """selected_row: page ids of one KV head (current page last) -> a cell value per page."""
    cells = np.full(num_pages, READ if dense else 0.0)
    if not dense:
        cells[selected_row] = SELECTED
    cells[num_pages - 1] = CURRENT
    return cells


def heads_by_pages(step, layer, page_size, page_labels):
    """Which pages each KV head of `layer` read at `step` (a StepTrace). page_labels[p]: hover text of page p."""
    num_pages = -(-step.context_len // page_size)
    pages = step.selected_pages
    dense = pages is None or pages[layer, 0, 0] < 0
    num_heads = 1 if pages is None else pages.shape[1]
    z = np.stack([_page_cells(None if dense else pages[layer, h].numpy(), num_pages, dense) for h in range(num_heads)])
    hover = np.array([page_labels[:num_pages]] * num_heads)
    figure = go.Figure(go.Heatmap(z=z, text=hover, hovertemplate="head %{y}, page %{x}<br>%{text}<extra></extra>",
                                  colorscale=COLORS, zmin=0, zmax=1, showscale=False, xgap=0))
    figure.update_yaxes(title="KV head", dtick=1)
    figure.update_xaxes(title="page")
    kind = "dense layer: every page read" if dense else f"{pages.shape[2]} of {num_pages} pages read"
    return _layout(figure, f"Layer {layer}, at {step.context_len} tokens: {kind}", 90 + 40 * num_heads)


def steps_by_pages(steps, layer, head, page_size):
    """Selection over time for one layer and KV head: rows are decode steps, columns pages. (No per-cell hover
    text: steps x pages labels would make the figure megabytes.)"""
    num_pages = -(-steps[-1].context_len // page_size)
    z = np.zeros((len(steps), num_pages))
    for row, step in enumerate(steps):
        pages_now = -(-step.context_len // page_size)
        dense = step.selected_pages is None or step.selected_pages[layer, 0, 0] < 0
        selected = None if dense else step.selected_pages[layer, head].numpy()
        z[row, :pages_now] = _page_cells(selected, pages_now, dense)
    figure = go.Figure(go.Heatmap(z=z, hovertemplate="step %{y}, page %{x}<extra></extra>",
                                  colorscale=COLORS, zmin=0, zmax=1, showscale=False))
    figure.update_yaxes(title="decode step", autorange="reversed")
    figure.update_xaxes(title="page")
    return _layout(figure, f"Layer {layer}, KV head {head}: selected pages over time", 320)


def step_times(current, previous, current_label, previous_label):
    """ms per decode step of the current run next to the last run in the other mode."""
    figure = go.Figure()
    for times, label, color in ((previous, previous_label, "#9ca3af"), (current, current_label, "#1d4ed8")):
        if times:
            figure.add_trace(go.Scatter(y=[1000 * t for t in times], mode="lines", name=label, line=dict(color=color)))
    figure.update_yaxes(title="ms / token", rangemode="tozero")
    figure.update_xaxes(title="step")
    figure.update_layout(legend=dict(orientation="h", y=1.15))
    return _layout(figure, "Time per token", 220)
