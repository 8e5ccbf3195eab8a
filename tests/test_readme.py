"""Every ```python block of the README runs (in a scratch folder), so its examples cannot rot."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_the_readme_has_python_examples():
    assert EXAMPLES


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(EXAMPLES[index], f"README.md python example {index + 1}", "exec")
    # A block that starts with "# needs: ..." names what it needs that a test run lacks (a running
    # server); it is compiled above but not run, and the test it names runs the same calls.
    needs = re.match(r"# needs: (.*)", EXAMPLES[index])
    if needs:
        pytest.skip(f"needs {needs.group(1)}")
    exec(code, {"__name__": f"readme_example_{index + 1}"})
