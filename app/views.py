"""The app's texts: header, document notes, context meter, live metrics, the Quest-vs-dense headline and the Compare
panes. Plain strings (Markdown or HTML) from what the engine reports; no Gradio here."""
import html
from dataclasses import dataclass
from pathlib import Path

from quest_core.trace import mean_pages_read


@dataclass
class Speed:
    """One answer's speed, for the headline."""
    tokens_per_s: float
    attention_s: float | None  # mean seconds per step in attention (all layers); None where not measured
    kv_ratio: float        # KV bytes a dense step reads / bytes this answer's steps read
    context_tokens: int    # the context the answer was conditioned on
    source: str            # "Compare" or "chat"
    kv_steps: tuple        # (context lengths, KV bytes read) of its traced steps
    shared: bool = False   # some steps waited for another session's prefill: slower than alone

    @property
    def ms_per_token(self) -> float:
        return 1000 / self.tokens_per_s


def counted(count: int, noun: str) -> str:
    """The count and its noun, plural unless the count is 1: "1 token", "2,048 tokens"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def header(model, backend_text: str, max_context: int, max_new_tokens: int, max_sessions: int) -> str:
    name = Path(getattr(model.config, "_name_or_path", "") or type(model).__name__).name
    dtype = str(model.dtype).removeprefix("torch.")
    device = next(model.parameters()).device
    return (f"Model **{name}** · {dtype} · {device} · attention backend **{backend_text}** · "
            f"context {max_context:,} tokens · answers up to {counted(max_new_tokens, 'token')} · "
            f"{counted(max_sessions, 'session')} at once")


def backend_text(backend) -> str:
    """Which attention backend runs, and why when it is not the one asked for (the backend says)."""
    return "torch" if backend is None else backend.describe()


def document_note(fit, max_context: int, keep: str | None = None) -> str:
    """What loading a document of `fit` (a DocumentFit) would do; `keep` ("head" or "tail") is the end chosen to
    keep of one that does not fit."""
    share = 100 * fit.tokens / max_context
    if fit.fits:
        return (f"{counted(fit.tokens, 'token')}, {share:.0f}% of the {max_context:,}-token context; "
                f"press **Load document**.")
    too_long = f"{fit.tokens:,} tokens: **longer than the context leaves room for**"
    if keep is not None:
        end = "first" if keep == "head" else "last"
        return f"{too_long}. **Load document** keeps its {end} {fit.max_tokens:,} tokens."
    return (f"{too_long} (at most {fit.max_tokens:,} tokens, so that questions and answers fit). Choose *keep the "
            "head* or *keep the tail*, then **Load document**.")


def meter(usage) -> str:
    """The context as a bar: document, conversation, room left (a ContextUsage)."""
    parts = [("document", usage.document_tokens, "#1d4ed8"), ("conversation", usage.conversation_tokens, "#a78bfa"),
             ("room left", usage.room_tokens, "#e5e7eb")]
    bars = "".join(f"<div title='{name}: {counted(tokens, 'token')}' "
                   f"style='width:{100 * tokens / usage.max_context:.2f}%;background:{color}'></div>"
                   for name, tokens, color in parts if tokens > 0)
    keys = " · ".join(f"<span style='color:{color if name != 'room left' else '#9ca3af'}'>■</span> {name} "
                      f"<b>{tokens:,}</b>" for name, tokens, color in parts)
    return (f"<div style='font-size:0.9em'>Context of {usage.max_context:,} tokens: {keys}</div>"
            "<div style='display:flex;height:12px;border-radius:4px;overflow:hidden;border:1px solid #d1d5db;"
            f"margin-top:4px'>{bars}</div>")


ENDINGS = {"eos": "complete", "max_new_tokens": "cut at {}", "cancelled": "stopped"}  # RunStats.stop_reason


def metrics(mode: str, steps: list, run, recall: float | None = None) -> str:
    """Live metrics of an answer from its steps so far (engine Steps); `run` is its RunStats (prefill counts, and
    the engine's decode rate once the answer has ended)."""
    if not steps:
        return f"**{mode}** · prefilling the question…"
    decode_s = sum(step.seconds for step in steps[1:])
    rate = run.decode_tokens_per_s if run.new_tokens else (len(steps) - 1) / decode_s if decode_s > 0 else 0.0
    state = (ENDINGS.get(run.stop_reason, "{}").format(counted(run.max_new_tokens, "token")) if run.new_tokens
             else "streaming…")
    setting = f" · {budget_text(run)}" if mode == "quest" else ""
    lines = [f"**{mode}**{setting} · {counted(len(steps), 'token')} · decode **{rate:.1f} tok/s** · "
             f"TTFT {steps[0].seconds:.2f} s · context {steps[-1].context_len:,} tokens · "
             f"prefilled {run.prefill_tokens:,}, reused {run.reused_tokens:,} · {state}"]
    traced = [step.trace for step in steps if step.trace is not None]
    if traced:
        last = traced[-1]
        line = (f"KV read per step: {last.read_bytes / 2**20:.2f} of {last.dense_bytes / 2**20:.2f} MiB "
                f"({kv_saving(last.dense_bytes / max(last.read_bytes, 1))})")
        timed = [trace.attention_s for trace in traced if trace.attention_s is not None]
        if timed:
            line += f" · attention {1000 * sum(timed) / len(timed):.1f} ms per step"
        if run.top_p is not None and (pages := mean_pages_read(traced)) is not None:
            line += f" · {budget_text(run)}: {pages:.1f} pages per head on average"
        lines.append(line)
    if recall is not None:
        lines.append(f"Selection recall (dense attention mass on the selected pages): {recall:.3f}")
    return "  \n".join(lines)


def kv_saving(ratio: float, bold: bool = False) -> str:
    """What Quest's KV reads save, from `ratio` = the bytes dense reads / the bytes Quest read. On a short context
    Quest reads more: every page's bounds, and nearly every page."""
    mark = "**" if bold else ""
    if ratio >= 1.05:
        return f"{mark}{ratio:.1f}× fewer{mark} than dense"
    if ratio > 0.95:
        return "about as many as dense"
    return (f"{mark}{1 / ratio:.2f}× more{mark} than dense: at this context the page bounds cost more than the "
            "pages Quest skips")


SHARED = ("  \n*Measured while another session loaded a document: the engine ran its prefill between these "
          "steps, so {} slower than alone.*")


def headline(speeds: dict) -> str:
    """Quest vs dense on the loaded document, from `speeds` (mode -> Speed)."""
    if not speeds:
        return ""
    shared = [("Quest" if mode == "quest" else "dense") for mode, speed in speeds.items() if speed.shared]
    caveat = SHARED.format(" and ".join(shared) + (" were" if len(shared) > 1 else " was")) if shared else ""
    if len(speeds) == 1:
        (mode, speed), = speeds.items()
        other = "dense" if mode == "quest" else "Quest"
        return (f"**Quest vs dense on this document:** {'Quest' if mode == 'quest' else 'dense'} "
                f"{speed.tokens_per_s:.1f} tok/s so far. Answer with {other}, or press **Compare**, to measure the "
                "other on this document." + caveat)
    dense, quest = speeds["dense"], speeds["quest"]
    same = dense.source == quest.source == "Compare"
    where = ("Compare: the same question and context" if same else f"your last answers: dense at "
             f"{dense.context_tokens:,}, Quest at {quest.context_tokens:,} tokens of context")
    step_gain = quest.tokens_per_s / dense.tokens_per_s
    text = (f"**Quest vs dense on this document** ({where}): whole step "
            f"**{step_gain:.2f}×** ({dense.tokens_per_s:.1f} → {quest.tokens_per_s:.1f} tok/s)")
    attention_gain = dense.attention_s / quest.attention_s if dense.attention_s and quest.attention_s else None
    if attention_gain:
        text += (f" · attention alone **{attention_gain:.1f}×** "
                 f"({1000 * dense.attention_s:.1f} → {1000 * quest.attention_s:.1f} ms per step)")
    text += f" · KV bytes read: {kv_saving(quest.kv_ratio, bold=True)}"
    text += " (the theoretical attention speedup)." if quest.kv_ratio >= 1.05 else "."
    if attention_gain:
        share = dense.attention_s / (dense.ms_per_token / 1000)
        text += (f"  \nAttention is {100 * share:.0f}% of a dense step here; the rest (MLPs, projections, the "
                 "vocabulary) costs the same in both modes, so the step gains less than the attention")
        if not (1 <= step_gain <= attention_gain or attention_gain <= step_gain <= 1):
            text += (": here the whole steps differ in a way attention cannot explain, which is the two runs' timing "
                     "(other work on this machine, or chance)")
        text += "."
    return text + caveat


def attention_used(config) -> str:
    """The attention an answer runs with (a QuestConfig or RunStats), for its chat message."""
    return "dense attention" if config.mode == "dense" else f"Quest attention · {budget_text(config)}"


def budget_text(run) -> str:
    """The budget a Quest answer (a RunStats, or the QuestConfig it runs with) ran with, and its ranking where it
    had two levels."""
    ranking = ", two-level ranking" if run.coarse_factor else ""
    if run.top_p is None:
        return f"budget {run.budget}{ranking}"
    return f"top-p {run.top_p:g}, up to {-(-run.budget // run.page_size)} pages of {run.page_size}{ranking}"


def compare_pane(run, label: str, first_difference: int | None) -> str:
    """One Compare answer as HTML, the first token that differs from the other answer marked."""
    pieces = [html.escape(step.text) for step in run.steps]
    if first_difference is not None and first_difference < len(pieces):
        pieces[first_difference] = f"<mark title='first token that differs'>{pieces[first_difference] or '∅'}</mark>"
    body = "".join(pieces).replace("\n", "<br>")
    stopped = " · <i>stopped</i>" if run.stop_reason == "cancelled" else ""
    return (f"<b>{label}</b> · {run.decode_tokens_per_s:.1f} tok/s · TTFT {run.ttft_s:.2f} s{stopped}"
            f"<div class='answer'>{body}</div>")


def first_difference(dense, quest) -> int | None:
    """The first token where two runs differ (or where the shorter one ends); None if identical."""
    dense_ids = [step.token_id for step in dense.steps]
    quest_ids = [step.token_id for step in quest.steps]
    first = next((i for i, (a, b) in enumerate(zip(dense_ids, quest_ids)) if a != b), None)
    if first is None and len(dense_ids) != len(quest_ids):
        first = min(len(dense_ids), len(quest_ids))
    return first
