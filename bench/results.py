"""Writes a benchmark's table into bench/RESULTS.md, in a section of its own, with machine, date and command."""
import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({os.cpu_count()} CPU cores)"
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def header() -> str:
    return (f"- machine: {machine()}\n"
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n"
            f"- torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}\n"
            f"- command: `{shlex.join(['python', *sys.argv])}`\n")


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or add) the section `name` of RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n## {title}\n\n{header()}\n{body.strip()}\n{end}"
    empty = "# Benchmark results\n\nEach section is written by its script.\n"
    text = RESULTS.read_text() if RESULTS.exists() else empty
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
