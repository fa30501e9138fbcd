"""The README stays true: every setting is documented, and the quick start is the two commands."""

import re
from pathlib import Path

from core.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = set(re.findall(r"^\| `DRIFTLOOP_([A-Z0-9_]+)` \|", README, flags=re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_quick_start_is_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in quick.strip().splitlines()] == ["make demo", "make test"]
