"""Integrations of dft-peft's objectives into other trainers.

Nothing here is imported eagerly: `import dft_peft.integrations` never needs the
other tool. Each integration lives in its own submodule:

- `dft_peft.integrations.axolotl` — `DFTPlugin`, an Axolotl plugin: list
  `dft_peft.integrations.axolotl.DFTPlugin` under `plugins:` and set `loss: dft`
  in an Axolotl YAML (needs `pip install axolotl`).
"""

__all__: list[str] = []
