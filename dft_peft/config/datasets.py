"""`DatasetConfig`: one entry of the YAML `datasets:` / `test_datasets:` lists.

Key names and meanings follow Axolotl so an Axolotl config's dataset entries work unchanged.
`extra="forbid"` makes a mistyped key an error instead of a silently ignored setting; the
config module turns the pydantic error into a one-line `UserError`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dft_peft.config.dataset_types import resolve_type


DsType = Literal["json", "jsonl", "csv", "parquet", "arrow"]
TrainOnEos = Literal["turn", "all", "none", "last"]

# Axolotl's aliases for ShareGPT-style role names, so `from: human` / `from: gpt` rows work.
DEFAULT_ROLE_ALIASES: dict[str, list[str]] = {
    "system": ["system"],
    "user": ["user", "human"],
    "assistant": ["assistant", "gpt", "model"],
    "tool": ["tool"],
}


class DatasetConfig(BaseModel):
    """Where a dataset lives and how its rows become prompt/response segments."""

    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)  # min_weight: .nan is refused

    path: str = Field(description="Local file or folder, or a Hugging Face hub dataset id (org/name).")
    ds_type: DsType | None = Field(default=None, description="File type; inferred from the extension.")
    data_files: str | list[str] | None = None
    split: str = "train"
    name: str | None = Field(default=None, description="Hub dataset config (subset) name; unused for local files.")
    revision: str | None = Field(default=None, description="Hub dataset branch, tag or commit; unused for local files.")
    type: str = "alpaca"
    field: str = Field(default="text", description="Text column for `type: completion`.")
    field_messages: str = "messages"
    message_property_mappings: dict[str, str] = Field(default_factory=dict)
    message_field_role: str | None = Field(default=None, description="Older spelling of mappings.role.")
    message_field_content: str | None = Field(default=None, description="Older spelling of mappings.content.")
    roles: dict[str, list[str]] | None = Field(
        default=None, description="Canonical role -> names used in the data (Axolotl `roles`)."
    )
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"])
    train_on_eos: TrainOnEos | None = None
    train_on_eot: TrainOnEos | None = Field(default=None, description="end-of-turn tokens; default: as train_on_eos")
    eot_tokens: list[str] | None = Field(default=None, description="set from the top-level `eot_tokens`")
    drop_system_message: bool | None = None
    field_thinking: str = Field(default="reasoning_content", description="Message key holding the reasoning trace.")
    template_thinking_key: str | None = Field(
        default="reasoning_content", description="Name the chat template reads the reasoning trace under."
    )
    chat_template: str | None = None
    weight_field: str | None = None
    min_weight: float | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        return resolve_type(value)

    @model_validator(mode="before")
    @classmethod
    def _fold_legacy_mappings(cls, data: Any) -> Any:
        """Accept Axolotl's older `message_field_role/content` by folding them into the mapping."""
        if not isinstance(data, dict):
            return data
        mappings = dict(data.get("message_property_mappings") or {})
        for old, key in (("message_field_role", "role"), ("message_field_content", "content")):
            if data.get(old) and key not in mappings:
                mappings[key] = data[old]
        if mappings:
            data = {**data, "message_property_mappings": mappings}
        return data

    @model_validator(mode="after")
    def _weights_consistent(self) -> DatasetConfig:
        if self.min_weight is not None and self.weight_field is None:
            raise ValueError("`min_weight` needs `weight_field` (the column holding each row's weight).")
        return self

    @property
    def role_key(self) -> str:
        """Message key that holds the role."""
        return self.message_property_mappings.get("role", "role")

    @property
    def content_key(self) -> str:
        """Message key that holds the text."""
        return self.message_property_mappings.get("content", "content")

    def canonical_role(self, role: str) -> str:
        """Map a data role name (`human`, `gpt`) to the template's (`user`, `assistant`)."""
        aliases = self.roles if self.roles is not None else DEFAULT_ROLE_ALIASES
        for canonical, names in aliases.items():
            if role in names or role == canonical:
                return canonical
        return role
