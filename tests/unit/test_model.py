"""Model loading hints, pooling and the padded forward of one group, over the real bundled model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from embserve.model import (
    EmbeddingModel,
    pick_device,
    pick_dtype,
    pool,
    read_sentence_transformer_hints,
    resolve_source,
)
from embserve.settings import ModelSpec


def test_bundled_model_is_described_by_its_own_config(bundled_model):
    info = bundled_model.info
    assert (info.dimensions, info.max_length, info.vocab_size) == (384, 256, 30522)
    assert info.pooling == "mean"
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert bundled_model.pad_id == 0


def test_bundled_hints_come_from_its_sentence_transformers_files():
    hints = read_sentence_transformer_hints(resolve_source("bundled"))
    assert (hints.pooling, hints.max_seq_length, hints.normalize) == ("mean", 256, True)


def _model_folder(tmp_path, pooling_cfg: dict | None, normalize: bool, max_seq: int | None):
    modules = []
    if pooling_cfg is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if max_seq is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq}))
    return str(tmp_path)


@pytest.mark.parametrize(
    ("cfg", "pooling"),
    [
        ({"pooling_mode_cls_token": True}, "cls"),
        ({"pooling_mode_lasttoken": True}, "last"),
        ({"pooling_mode_mean_tokens": True}, "mean"),
        ({}, None),
    ],
)
def test_hints_read_the_pooling_mode_of_a_model_folder(tmp_path, cfg, pooling):
    hints = read_sentence_transformer_hints(_model_folder(tmp_path, cfg, normalize=False, max_seq=128))
    assert hints.pooling == pooling
    assert hints.max_seq_length == 128
    assert hints.normalize is False


def test_folder_without_sentence_transformers_files_gives_no_hints(tmp_path):
    hints = read_sentence_transformer_hints(str(tmp_path))
    assert (hints.pooling, hints.max_seq_length, hints.normalize) == (None, None, False)


def test_normalize_module_is_detected(tmp_path):
    assert read_sentence_transformer_hints(_model_folder(tmp_path, None, normalize=True, max_seq=None)).normalize


def test_uncached_hub_id_offline_gives_no_hints():
    hints = read_sentence_transformer_hints("embserve-tests/no-such-model")
    assert (hints.pooling, hints.max_seq_length, hints.normalize) == (None, None, False)


def test_non_bundled_source_is_passed_through():
    assert resolve_source("/models/x") == "/models/x"
    assert resolve_source("org/model") == "org/model"


def test_device_and_dtype_choice_on_this_machine():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("float16", "cpu") == torch.float16
    assert pick_dtype("bfloat16", "cuda") == torch.bfloat16


HIDDEN = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]],
                       [[5.0, 1.0], [7.0, 3.0], [2.0, 4.0]]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_mean_pooling_ignores_padding():
    torch.testing.assert_close(pool(HIDDEN, MASK, "mean"), torch.tensor([[2.0, 1.0], [14 / 3, 8 / 3]]))


def test_cls_pooling_takes_the_first_token():
    torch.testing.assert_close(pool(HIDDEN, MASK, "cls"), torch.tensor([[1.0, 0.0], [5.0, 1.0]]))


def test_last_pooling_takes_the_last_real_token_under_right_padding():
    torch.testing.assert_close(pool(HIDDEN, MASK, "last"), torch.tensor([[3.0, 2.0], [2.0, 4.0]]))


def test_padding_in_a_group_does_not_change_a_vector(bundled_model):
    short = [101, 7592, 102]
    long = [101, *range(2000, 2040), 102]
    alone = bundled_model.forward([short])
    padded = bundled_model.forward([long, short])
    assert padded.shape == (2, 384) and padded.dtype == np.float32
    np.testing.assert_allclose(padded[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(padded, axis=1), 1.0, atol=1e-5)


def test_max_length_past_the_position_limit_is_refused_at_load():
    with pytest.raises(ValueError, match="position limit of 512"):
        EmbeddingModel(ModelSpec(name="x", max_length=600), device="cpu")


def test_torch_threads_sets_the_forward_threads_of_the_process():
    before = torch.get_num_threads()
    try:
        EmbeddingModel(ModelSpec(name="x"), device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
