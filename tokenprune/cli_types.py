"""Argument types shared by the command-line front ends (``tokenprune``, its ``bench`` and ``visualize``
sub-commands), so that no front end imports another one for them."""

from __future__ import annotations

import argparse


def parse_keep(text: str) -> float | int:
    """'64' -> 64 tokens, '0.11' -> a ratio (validated by the budget controller)."""
    from tokenprune.budget import validate_keep

    try:
        value: float | int = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            message = f"keep must be a ratio like 0.11 or a token count like 64; got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
    try:
        return validate_keep(value)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
