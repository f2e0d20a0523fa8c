"""docs/sharding.md's Python snippets run as written, in order and in one namespace, on the 8
host devices of conftest, so that the guide stays true.

A snippet that cannot run in one process is fenced ```` ```python multiprocess ```` in the
document (the marker is visible in its source and named in its text). It is compiled, not run,
and reported as skipped; any other fence suffix is an error, so that nothing is skipped
silently.
"""

import pathlib
import re

import jax
import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "sharding.md"
MULTIPROCESS = "multiprocess"
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", flags=re.S | re.M)


def snippets() -> list[tuple[str, int, str]]:
    """`(marker, first line, code)` of every python block of the document."""
    text = DOC.read_text()
    return [(m[1].strip(), text.count("\n", 0, m.start(2)) + 1, m[2]) for m in FENCE.finditer(text)]


def _compiled(line: int, code: str):
    # Padded so that a traceback names the document's own line numbers.
    return compile("\n" * (line - 1) + code, str(DOC), "exec")


def test_markers_are_known():
    markers = [marker for marker, _, _ in snippets()]
    assert set(markers) <= {"", MULTIPROCESS}, markers
    assert markers.count(MULTIPROCESS) == 1, "only the multi-host set-up is not run"
    assert markers.count("") >= 4


def test_sharding_doc_snippets_run():
    assert jax.device_count() == 8
    namespace: dict = {}
    for marker, line, code in snippets():
        if marker == "":
            exec(_compiled(line, code), namespace)
    # The snippets' own assertions ran; and the buffer holds what was added.
    state = namespace["state"]
    assert int(state.current_index) == 32 and state.priority_state.sum_tree.shape[0] == 8
    assert namespace["state2"].priority_state.sum_tree.shape[0] == 2
    assert namespace["plain_sample"].experience.first["obs"].shape == (512, 4)


@pytest.mark.parametrize("marker, line, code",
                         [s for s in snippets() if s[0] == MULTIPROCESS],
                         ids=lambda x: str(x) if isinstance(x, int) else None)
def test_multiprocess_snippets_compile(marker, line, code):
    _compiled(line, code)
    pytest.skip(f"docs/sharding.md line {line}: needs several processes "
                "(tests/test_multihost.py runs these steps on two)")
