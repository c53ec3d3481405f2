"""`python -m dft_peft.cli ...`: the same CLI as `dft-peft` (and `python -m dft_peft`)."""

import sys

from dft_peft.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
