"""The README's Python example runs as written on a real feature cache."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_example_runs(offline_features, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "the README has one Python example; update this test with it"
    code = blocks[0].replace("features/<cache-folder>", str(offline_features.path))

    exec(compile(code, str(README), "exec"), {})

    # Two accuracies: the last layer's and the early exit's, both well above chance.
    printed = [float(line) for line in capsys.readouterr().out.split()]
    assert len(printed) == 2
    assert min(printed) > 0.6
