"""The README's configuration reference is the one the code generates."""

from pathlib import Path

from roomcast.config import markdown_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_reference_matches_the_code() -> None:
    text = README.read_text()
    start = text.index("<!-- config-reference:start -->") + len("<!-- config-reference:start -->")
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end].strip() == markdown_reference().strip(), (
        "README.md's configuration reference is stale: regenerate it from `python -m roomcast.config`"
    )
