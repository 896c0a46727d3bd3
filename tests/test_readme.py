"""The README's example runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[1].startswith("python3 dev.py tour") and lines[2].startswith("python3 dev.py test")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "exec python3 dev.py test\n" in ci


@pytest.mark.slow
def test_readme_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.cfg.model_name == "smollm2-135m"
