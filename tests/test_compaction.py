"""Dropping placeholders from a padded batch: ``tokenprune.compaction`` and the adapters' ``compacted_inputs``."""

import torch

from tokenprune.compaction import compact, padding_side, reindex_positions
from tokenprune.patches.base import compacted_inputs, pad_id


def test_padding_side_reads_the_mask():
    assert padding_side(None) == "left"
    assert padding_side(torch.tensor([[1, 1, 0], [1, 1, 1]])) == "right"
    assert padding_side(torch.tensor([[0, 1, 1], [1, 1, 1]])) == "left"
    assert padding_side(torch.tensor([[1, 0, 1]])) == "left"  # a hole inside a row is not padding


def test_compact_keeps_the_tokens_in_order_and_repads_on_the_side():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    keep = torch.tensor([[True, False, True, True], [False, False, True, True]])
    left = compact(keep, {"input_ids": (ids, 0)}, side="left")["input_ids"]
    right = compact(keep, {"input_ids": (ids, 0)}, side="right")["input_ids"]
    assert left.tolist() == [[1, 3, 4], [0, 7, 8]]
    assert right.tolist() == [[1, 3, 4], [7, 8, 0]]


def test_compact_drops_old_padding_so_no_row_keeps_the_batch_long():
    ids = torch.tensor([[0, 0, 9, 9], [1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    keep = torch.tensor([[True, True, True, True], [True, False, False, True]])
    out = compact(keep, {"input_ids": (ids, 0), "attention_mask": (mask, 0)}, side="left")
    assert out["input_ids"].tolist() == [[9, 9], [1, 4]]
    assert out["attention_mask"].tolist() == [[1, 1], [1, 1]]


def test_reindex_positions_closes_the_gaps():
    positions = torch.arange(6)[None]
    keep = torch.tensor([[True, False, False, True, True, True]])
    assert reindex_positions(positions, keep)[keep].tolist() == [0, 1, 2, 3]


def test_pad_id_takes_the_first_configured_id_unless_it_is_reserved():
    assert pad_id((None, 7), {1}) == 7
    assert pad_id((3, 7), {1}) == 3
    assert pad_id((None, None), {0}) == 1
    assert pad_id((5,), {5, 0, 1}) == 2


def test_compacted_inputs_drop_every_per_token_input_together():
    ids = torch.tensor([[10, 20, 20, 30], [10, 20, 30, 40]])
    keep = torch.tensor([[True, False, True, True], [True, True, True, True]])
    kwargs = {
        "input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(4).expand(2, 4),
        "pixel_values": torch.zeros(1), "use_cache": True,
    }
    out = compacted_inputs(kwargs, keep, pad=0, dropped=("pixel_values",), extra={"token_type_ids": (ids == 20, 0)})
    assert "pixel_values" not in out and out["use_cache"] is True
    assert out["input_ids"].tolist() == [[0, 10, 20, 30], [10, 20, 30, 40]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]  # rows of unequal length need a mask
    assert out["labels"].tolist() == [[-100, 10, 20, 30], [10, 20, 30, 40]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3]]
    assert out["token_type_ids"].tolist() == [[0, 0, 1, 0], [0, 1, 0, 0]]


def test_compacted_inputs_add_no_mask_when_rows_stay_equal():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    keep = torch.tensor([[True, False, True], [False, True, True]])
    out = compacted_inputs({"input_ids": ids}, keep, pad=0, dropped=())
    assert "attention_mask" not in out and out["input_ids"].tolist() == [[1, 3], [5, 6]]
