"""The engine's pure parts, on CPU without a process group: the DeepSpeed config bigtrain hands to
ZeRO-3 (its defaults, the user's JSON layered under the keys bigtrain owns, and the notes saying
what was overridden), full fine-tuning's config for ``bigtrain measure``, the dtype names, a padded
vocabulary's rows zeroed in a partition, and the per-rank storage count. DeepSpeed's version checks
and the world checks are in test_ds_config.py."""

import json

import pytest
import torch
from torch import nn

from bigtrain.config import ConfigError, ZeroConfig
from bigtrain.engine.build import local_param_bytes, zero_from_row
from bigtrain.engine.core import DTYPES
from bigtrain.engine.ds_config import build_ds_config, fetch_sizes, read_user_ds_config
from bigtrain.engine.full_ft import full_ft_ds_config


def test_dtypes_are_the_configs_names():
    assert DTYPES == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def test_fetch_sizes_are_one_layer_and_three_live():
    assert fetch_sizes(79_000_000) == {"stage3_prefetch_bucket_size": 79_000_000,
                                       "stage3_max_reuse_distance": 79_000_000,
                                       "stage3_max_live_parameters": 237_000_000}
    assert fetch_sizes(None) == {} and fetch_sizes(0) == {}


def test_ds_config_defaults_and_the_keys_bigtrain_owns():
    ds, notes = build_ds_config(ZeroConfig(), torch.bfloat16, micro_batch_size=2, grad_accum=3, world_size=4,
                                layer_numel=1000)
    assert ds == {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 100000,
                              "memory_efficient_linear": False, "stage3_prefetch_bucket_size": 1000,
                              "stage3_max_reuse_distance": 1000, "stage3_max_live_parameters": 3000},
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "train_batch_size": 24,
        "bf16": {"enabled": True}, "fp16": {"enabled": False}}
    assert notes == []
    ds, _ = build_ds_config(ZeroConfig(), torch.float16, 1, 1, 1)
    assert ds["fp16"] == {"enabled": True} and ds["bf16"] == {"enabled": False}
    assert "stage3_prefetch_bucket_size" not in ds["zero_optimization"]  # no model: DeepSpeed's own


def test_users_json_is_layered_under_bigtrains_keys_with_a_note_for_each(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0,
                                                   "stage3_max_reuse_distance": 7, "reduce_bucket_size": 5},
                             "train_batch_size": 999, "optimizer": {"type": "Adam"}, "steps_per_print": 10}))
    zero = ZeroConfig()
    zero.ds_config = str(f)
    ds, notes = build_ds_config(zero, torch.float32, 1, 2, 2, layer_numel=100)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "memory_efficient_linear": False, "stage3_prefetch_bucket_size": 100,
                                       "stage3_max_reuse_distance": 7, "stage3_max_live_parameters": 300,
                                       "reduce_bucket_size": 5}
    assert ds["train_batch_size"] == 4 and ds["steps_per_print"] == 10 and ds["optimizer"] == {"type": "Adam"}
    assert notes == [
        f"stage3_param_persistence_threshold: 0 from {f} is used; zero.persistence_threshold=100000 is not",
        "optimizer/scheduler in the DeepSpeed config are ignored: the adapters are stepped by bigtrain's "
        "AdamW (train.lr, train.schedule)",
        f"train_batch_size: 999 in {f} replaced by 4 (from bigtrain's config)"]


def test_users_json_refusals_name_the_file_and_the_value(tmp_path):
    zero = ZeroConfig()
    assert read_user_ds_config(zero) == {}
    zero.ds_config = str(tmp_path / "stage2.json")
    (tmp_path / "stage2.json").write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError) as e:
        read_user_ds_config(zero)
    assert str(e.value) == (f"zero.ds_config: {zero.ds_config} sets zero_optimization.stage=2; bigtrain "
                            f"partitions the frozen base with stage 3")
    zero.ds_config = str(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n}')
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON \(line 3\)"):
        read_user_ds_config(zero)


def test_full_ft_config_is_deepspeeds_adamw_with_mixed_precision():
    ds = full_ft_ds_config(3, torch.bfloat16, 2, 4, 8, 1e-4, (0.9, 0.95), 0.01, 1.0, 12345)
    assert ds == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "train_batch_size": 64,
                  "bf16": {"enabled": True}, "fp16": {"enabled": False},
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 12345},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01,
                                                            "torch_adam": True}},
                  "steps_per_print": 1 << 30, "wall_clock_breakdown": False, "gradient_clipping": 1.0}
    ds = full_ft_ds_config(2, torch.float16, 1, 1, 1, 1e-3, (0.9, 0.999), 0.0, 0.0, 12345)
    assert ds["zero_optimization"] == {"stage": 2} and "gradient_clipping" not in ds
    assert ds["fp16"] == {"enabled": True}


def _partitioned(shape, partition: torch.Tensor) -> nn.Parameter:
    """A parameter as zero.Init leaves it at world size 1: its partition is the whole flattened tensor."""
    p = nn.Parameter(torch.empty(0), requires_grad=False)
    p.ds_shape, p.ds_numel, p.ds_tensor, p.ds_process_group = torch.Size(shape), partition.numel(), partition, None
    return p


def test_zero_from_row_zeroes_the_padded_rows_of_the_partition():
    part = torch.arange(1.0, 13.0)  # a (4, 3) embedding, flattened
    zero_from_row(_partitioned((4, 3), part), 2)
    assert part.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_local_param_bytes_counts_partitions_gathered_copies_and_quantized_sections():
    plain = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    assert local_param_bytes(plain) == (12 + 4 + 8) * 4
    tied = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5, bias=False))
    tied[1].weight = tied[0].weight  # counted once
    assert local_param_bytes(tied) == 10 * 4
    p = _partitioned((4, 3), torch.zeros(6, dtype=torch.bfloat16))  # half of it: 6 bf16 elements
    p.data = torch.zeros(4, 3, dtype=torch.bfloat16)  # gathered: the whole tensor too
    holder = nn.Module()
    holder.w = p
    assert local_param_bytes(holder) == (6 + 12) * 2
    p.data = p.ds_tensor  # released (aliased at world size 1): one copy
    assert local_param_bytes(holder) == 6 * 2
    p.bt_sections = {"codes": torch.zeros(6, dtype=torch.uint8), "scales": torch.zeros(1)}
    assert local_param_bytes(holder) == 6 * 2 + 6 + 4
