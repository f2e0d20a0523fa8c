"""README's Python snippets run as written (one namespace, in order)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3, "README should show the functional, Linen and NNX snippets"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # The snippets' own assertions ran; check the Linen apply really wrote the buffer.
    assert int(namespace["variables"]["replay"]["replay"]["current_index"]) == 1


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r'pip install -e "\.\[test\]" && (python -m pytest[^\n`]*)', text)
    assert command, "README's second set-up command installs the test extra and runs pytest"
    assert f"\n{command.group(1)}\n" in ci and '".[test]"' in ci
    assert "python examples/dqn_per.py" in text
