"""Every Python block of README.md runs as written (it is documentation).

A block runs in a fresh namespace, unless its first line is
``# Continues the previous block.``: it then runs in the namespace the
previous block left. Each chain of blocks is one test, run in a temporary
directory (the blocks write files there). A chain that imports a package
that is missing (torch, flax, orbax, matplotlib) is skipped.
"""

import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
CONTINUES = "# Continues the previous block."
OPTIONAL = ("torch", "flax", "orbax", "matplotlib")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block, in order."""
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 2
        blocks.append((line, match.group(1)))
    return blocks


def chains(blocks: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    out: list[list[tuple[int, str]]] = []
    for line, code in blocks:
        if code.startswith(CONTINUES):
            if not out:
                raise ValueError(f"README.md:{line} continues a block, but none comes before")
            out[-1].append((line, code))
        else:
            out.append([(line, code)])
    return out


CHAINS = chains(python_blocks(README.read_text(encoding="utf-8")))


def test_the_blocks_are_found():
    # A pattern that found nothing would make the test below vacuous.
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 10
    assert sum(len(chain) for chain in CHAINS) == len(blocks)
    assert any(len(chain) > 1 for chain in CHAINS)


def test_a_continued_block_needs_a_previous_one():
    with pytest.raises(ValueError, match="continues a block"):
        chains([(3, CONTINUES + "\nx = 1\n")])


@pytest.mark.parametrize("chain", CHAINS, ids=lambda chain: f"line{chain[0][0]}")
def test_readme_block_runs(chain, tmp_path, monkeypatch):
    code = "".join(block for _, block in chain)
    for name in OPTIONAL:
        uses = re.search(rf"^\s*(import|from) {name}\b", code, flags=re.M)
        if uses and importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name}")
    if "matplotlib" in code or "plot(" in code:
        if importlib.util.find_spec("matplotlib") is None:
            pytest.skip("needs matplotlib")
        import matplotlib

        matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for line, block in chain:
        exec(compile(block, f"README.md:{line}", "exec"), namespace)
