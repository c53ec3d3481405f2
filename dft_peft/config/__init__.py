"""The YAML config: Axolotl's key names, checked up front, one clear line per problem.

Where each concern lives:

* `schema.py`     the fields, their types and defaults (`Config`, `SpecialTokens`);
* `normalize.py`  Axolotl's alternative spellings folded into one field;
* `checks.py`     rules that span several keys;
* `keys.py`       which keys are ours, an objective's, Axolotl's, or typos;
* `axolotl_keys.py` Axolotl's own key tables (what we implement, accept or refuse);
* `paths.py`      the relative-path rule; `load.py` reading a file and CLI overrides;
* `messages.py`   pydantic / YAML errors turned into one line; `describe.py` `validate`'s summary.
"""

from dft_peft.config.keys import is_axolotl_key
from dft_peft.config.load import Config, build_config, load_config, parse_overrides
from dft_peft.config.schema import SpecialTokens

__all__ = ["Config", "SpecialTokens", "build_config", "is_axolotl_key", "load_config", "parse_overrides"]
