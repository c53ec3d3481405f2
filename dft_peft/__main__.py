"""`python -m dft_peft ...`: the same CLI as `dft-peft`.

Launchers take a module rather than a console script: `torchrun --nproc-per-node 2 -m dft_peft
train config.yml` and `accelerate launch -m dft_peft train config.yml` start one process of this
module per device.
"""

import sys

from dft_peft.cli import main

if __name__ == "__main__":
    sys.exit(main())
