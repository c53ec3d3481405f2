"""The command line: `dft-peft train | validate | compare | export | ...` (entry point `dft_peft.cli:main`)."""

from dft_peft.cli.commands import main

__all__ = ["main"]
