"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    fence = readme.index("```bash")
    main_cmd, test_cmd = readme[fence + 1], readme[fence + 2]
    assert "pytest" in test_cmd and "householder" in main_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, "the README's test command must appear verbatim in .ci/run"
