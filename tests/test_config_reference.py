import textwrap
from pathlib import Path

import pytest

from configs import schema
from configs.reference import PAGE, field_comments, render
from scripts import config_reference


def test_committed_page_is_the_rendered_schema():
    assert PAGE.read_text() == render(), "docs/configuration.md is out of date: run python scripts/config_reference.py"


def test_a_key_without_a_meaning_is_refused_naming_every_one():
    source = Path(schema.__file__).read_text()
    for comment in ("  # optuna mode with available_gpus []: worker processes on the CPU",
                    "  # longest generated answer, in tokens"):
        assert source.count(comment) == 1
        source = source.replace(comment, "")
    with pytest.raises(ValueError) as err:
        render(source)
    assert "manager_settings.cpu_workers" in str(err.value) and "data_settings.max_new_tokens" in str(err.value)
    assert "output_dir" not in str(err.value)


def test_a_meaning_is_the_comment_block_above_and_the_end_of_line():
    source = textwrap.dedent("""
        class Section:
            # first line
            # second line
            a: int = 1  # the end
            b: int = 2

            # after a blank line
            c: int = 3
            d: list[int] = field(
                default_factory=list)  # on the statement's last line
            # a blank line parts this from e

            e: int = 5
    """)
    assert field_comments(source) == {("Section", "a"): "first line second line the end",
                                      ("Section", "c"): "after a blank line",
                                      ("Section", "d"): "on the statement's last line"}


def test_check_says_in_one_line_when_the_page_is_stale(tmp_path, capsys):
    page = tmp_path / "configuration.md"
    page.write_text("# Configuration reference\n")
    assert config_reference.main(["--check", "--page", str(page)]) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.endswith("run python scripts/config_reference.py")
    assert config_reference.main(["--page", str(page)]) == 0
    assert config_reference.main(["--check", "--page", str(page)]) == 0
