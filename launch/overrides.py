"""Command-line overrides shared by the Hydra entry points (train, eval)."""

from __future__ import annotations


def quote_numeric_choices(argv: list[str], groups: tuple[str, ...] = ("game",)) -> list[str]:
    """Quotes numeric config-group choices: Hydra parses `game=2048` as the int 2048 and refuses it as a choice."""
    return [
        f"{arg.split('=', 1)[0]}='{arg.split('=', 1)[1]}'"
        if "=" in arg and arg.split("=", 1)[0] in groups and arg.split("=", 1)[1].isdigit()
        else arg
        for arg in argv
    ]
