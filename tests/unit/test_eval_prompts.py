"""The model card's held-out prompts: the first function of each file of the held-out packages."""

from __future__ import annotations

from converters.eval_bundle import first_function_prompts


def test_each_prompt_ends_with_the_files_first_def_line() -> None:
    files = [
        ("pkg/a.py", '"""A module."""\nimport os\n\n\nclass A:\n'
                     "    def method(self, x: int) -> int:\n        return x\n"),
        ("pkg/b.py", "X = 1\n"),  # no function: no prompt
        ("pkg/c.py", "async def fetch(url):\n    pass\n\ndef later():\n    pass\n"),
        ("pkg/d.py", "def split(\n    a,\n):\n    pass\n\ndef one_line(a, b=(1, 2)):\n    pass\n"),
    ]
    prompts = first_function_prompts(files, n=10)
    assert [name for name, _ in prompts] == ["pkg/a.py:6", "pkg/c.py:1", "pkg/d.py:6"]
    assert prompts[0][1].endswith("    def method(self, x: int) -> int:\n") and prompts[0][1].startswith('"""A module')
    assert prompts[1][1] == "async def fetch(url):\n"
    assert prompts[2][1].endswith("def one_line(a, b=(1, 2)):\n")  # a signature over several lines is skipped


def test_long_files_are_cut_at_a_line_start_and_n_spreads_over_the_files() -> None:
    head = "".join(f"CONSTANT_{i} = {i}\n" for i in range(200))
    files = [(f"pkg/m{i}.py", head + f"def f{i}():\n    pass\n") for i in range(9)]
    prompts = first_function_prompts(files, n=3, max_chars=300)
    assert [name for name, _ in prompts] == ["pkg/m0.py:201", "pkg/m3.py:201", "pkg/m6.py:201"]
    for _, text in prompts:
        assert len(text) <= 300 and text.startswith("CONSTANT_") and text.endswith("():\n")
