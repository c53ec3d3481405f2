"""Packing and collation: bins, boundaries, and packed loss == unpacked loss on a real tiny Llama."""

from __future__ import annotations

import random

import pytest
import torch
from test_data_helpers import make_tokenizer

from dft_peft.data import make_collator
from dft_peft.data.packing import pack_dataset, plan_bins

# --- bin planning ----------------------------------------------------------------------------------


def test_plan_bins_known_instance():
    # 6+4 and 5+3+2 fill two bins of 10 exactly.
    bins = plan_bins([6, 5, 4, 3, 2], 10)
    assert sorted(sorted(b) for b in bins) == [[0, 2], [1, 3, 4]]


@pytest.mark.parametrize("seed", range(5))
def test_plan_bins_valid_and_tight(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 64) for _ in range(300)]
    bins = plan_bins(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))  # every row exactly once
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    lower_bound = -(-sum(lengths) // 64)
    assert len(bins) <= 11 * lower_bound // 9 + 1  # best-fit decreasing guarantee vs. OPT >= lower_bound


def test_plan_bins_rejects_oversized_row():
    with pytest.raises(ValueError):
        plan_bins([5, 11], 10)


# --- packed dataset --------------------------------------------------------------------------------


def _tokenized(rows):
    """A tokenized-looking dataset: row i has ids i*100 + k, labels masked on the first half."""
    from datasets import Dataset

    data = {"input_ids": [], "labels": [], "attention_mask": [], "weights": []}
    for i, n in enumerate(rows):
        ids = [i * 100 + k for k in range(n)]
        data["input_ids"].append(ids)
        data["labels"].append([-100] * (n // 2) + ids[n // 2 :])
        data["attention_mask"].append([1] * n)
        data["weights"].append([float(i)] * n)
    return Dataset.from_dict(data)


def _split_rows(example):
    """Recover the rows of a packed example from where position_ids restart (the reference view)."""
    rows, start = [], 0
    pos = example["position_ids"]
    for k in range(1, len(pos) + 1):
        if k == len(pos) or pos[k] == 0:
            rows.append({key: example[key][start:k] for key in ("input_ids", "labels", "position_ids", "weights")})
            start = k
    return rows


def test_pack_dataset_preserves_rows_and_marks_boundaries():
    lengths = [7, 3, 12, 5, 9, 1, 16, 4]
    ds = _tokenized(lengths)
    packed, report = pack_dataset(ds.select([7, 0, 2, 5, 1, 6, 3, 4]), 16)  # index mapping must be honoured
    assert report.rows == 8 and report.tokens == sum(lengths) and report.bins == len(packed)
    assert packed.column_names == ["input_ids", "labels", "weights", "position_ids"]
    seen = []
    for example in packed:
        assert len(example["input_ids"]) <= 16
        for row in _split_rows(example):
            i = row["input_ids"][0] // 100
            n = lengths[i]
            assert row["input_ids"] == [i * 100 + k for k in range(n)]
            assert row["position_ids"] == list(range(n))
            assert row["weights"] == [float(i)] * n
            expected = [-100] * (n // 2) + row["input_ids"][n // 2 :]
            expected[0] = -100  # first label of every packed row is masked
            assert row["labels"] == expected
            seen.append(i)
    assert sorted(seen) == list(range(8))


# --- collator --------------------------------------------------------------------------------------


def test_unpacked_collator_pads_right():
    tok = make_tokenizer()
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = make_collator(tok, sample_packing=False, pad_to_sequence_len=False, sequence_len=16)(rows)
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch
    padded = make_collator(tok, sample_packing=False, pad_to_sequence_len=True, sequence_len=6)(rows)
    assert padded["input_ids"].shape == (2, 6) and padded["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]


def test_packed_collator_has_positions_and_no_attention_mask():
    tok = make_tokenizer()
    rows = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, -100, 4], "position_ids": [0, 1, 0, 1], "weights": [1.0] * 4},
        {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1], "weights": [2.0] * 2},
    ]
    batch = make_collator(tok, sample_packing=True, pad_to_sequence_len=True, sequence_len=5)(rows)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 2, -100, 4, -100], [-100, 6, -100, -100, -100]]
    assert batch["token_weights"].tolist() == [[1, 1, 1, 1, 0], [2, 2, 0, 0, 0]]
    flat = make_collator(tok, sample_packing=True, pad_to_sequence_len=False, sequence_len=5, flatten=True)(rows)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert flat["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1]]


# --- transformers' packed-sequence masking, and the end-to-end loss equivalence ----------------------


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).float().eval()


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Reference loss: float64 cross-entropy of token t+1 given tokens <= t, summed over labelled tokens."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-(picked * keep).sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_builds_block_diagonal_mask_from_position_ids(attn):
    """What the collator relies on: no attention_mask + restarting position_ids => block-diagonal causal."""
    from transformers.masking_utils import create_causal_mask

    model = _tiny_llama(attn)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    embeds = torch.zeros(1, 8, 64)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=embeds, attention_mask=None, past_key_values=None, position_ids=position_ids
    )
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    expected = (seq[:, None] == seq[None, :]) & (torch.arange(8)[:, None] >= torch.arange(8)[None, :])
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    assert torch.equal(allowed, expected)


def _forward(model, batch) -> torch.Tensor:
    """Call the model the way the HF Trainer does: every batch key but the targets as kwargs."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_weights")}
    with torch.no_grad():
        return model(**inputs).logits


def _rows():
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in [9, 23, 5, 17, 30, 12, 2, 26]:
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3 :]
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * n})
    return rows


def _unpacked_reference(model, rows) -> float:
    """Every row alone, unpadded, through a plain causal forward."""
    return sum(
        _summed_loss(_forward(model, {"input_ids": torch.tensor([r["input_ids"]])}), torch.tensor([r["labels"]]))
        for r in rows
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("flatten", [False, True])
def test_packed_loss_equals_unpacked(attn, flatten):
    from datasets import Dataset

    model, tok, rows = _tiny_llama(attn), make_tokenizer(), _rows()
    expected = _unpacked_reference(model, rows)
    packed, report = pack_dataset(Dataset.from_list(rows), 40)
    assert report.bins >= 3 and report.bins < len(rows)  # several rows share bins
    examples = [packed[i] for i in range(len(packed))]
    collate = make_collator(tok, sample_packing=True, pad_to_sequence_len=True, sequence_len=40, flatten=flatten)
    batch = collate(examples)
    assert batch["input_ids"].shape == ((1, 40 * len(examples)) if flatten else (len(examples), 40))
    got = _summed_loss(_forward(model, batch), batch["labels"])
    assert got == pytest.approx(expected, abs=1e-5, rel=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unpacked_collator_loss_equals_rows_alone(attn):
    model, tok, rows = _tiny_llama(attn), make_tokenizer(), _rows()
    batch = make_collator(tok, sample_packing=False, pad_to_sequence_len=False, sequence_len=40)(rows)
    got = _summed_loss(_forward(model, batch), batch["labels"])
    assert got == pytest.approx(_unpacked_reference(model, rows), abs=1e-5, rel=0)


def test_packing_needs_restarting_positions_and_no_cache():
    """Controls showing the test above has teeth, and pinning the transformers behaviour we rely on:
    rows leak into each other without restarting position_ids, and also when a KV cache exists
    (use_cache defaults to True, which is why packed batches carry use_cache=False)."""
    from datasets import Dataset

    model, tok, rows = _tiny_llama("sdpa"), make_tokenizer(), _rows()
    expected = _unpacked_reference(model, rows)
    packed, _ = pack_dataset(Dataset.from_list(rows), 40)
    batch = make_collator(tok, sample_packing=True, pad_to_sequence_len=True, sequence_len=40)(list(packed))
    assert batch["use_cache"] is False
    no_positions = {k: v for k, v in batch.items() if k != "position_ids"}
    assert abs(_summed_loss(_forward(model, no_positions), batch["labels"]) - expected) > 1e-3
    with_cache = dict(batch, use_cache=True)
    assert abs(_summed_loss(_forward(model, with_cache), batch["labels"]) - expected) > 1e-3
