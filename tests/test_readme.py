"""The README's Python example runs as written (a doctest)."""

from __future__ import annotations

import doctest
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_example():
    text = README.read_text()
    start = text.index("```python\n>>> ")
    example = text[start + len("```python\n"): text.index("```", start + 10)]
    parser = doctest.DocTestParser()
    test = parser.get_doctest(example, {}, "README.md", str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert test.examples and runner.failures == 0
