"""Checkpoints load under torch's weights_only unpickler: training-loop and
zoo-style metadata through an allowlist, anything else refused."""
import collections

import numpy as np
import pytest
import torch
from model_fixtures import RTMDET_TINY, save_random_checkpoint

from mmdet_ls.inference import BatchDetector
from mmdet_ls.model_files import ModelFileError, resolve_config_file


@pytest.fixture(scope="module")
def state_dict(tmp_path_factory):
    path = save_random_checkpoint(RTMDET_TINY, tmp_path_factory.mktemp("ckpt") / "plain.pth")
    return torch.load(path, weights_only=True)["state_dict"]


def test_training_loop_checkpoint_with_non_tensor_metadata_loads(tmp_path, state_dict):
    from mmengine.config import ConfigDict
    from mmengine.logging import HistoryBuffer

    buffer = HistoryBuffer()
    buffer.update(0.5)
    checkpoint = {
        "meta": {
            "dataset_meta": {"classes": ("car", "airplane", "person")},
            "mmengine_version": "0.10.7", "epoch": 12, "iter": 3000, "seed": np.int64(7),
            "cfg": ConfigDict(a=1), "lr": np.float64(0.004),
        },
        "state_dict": collections.OrderedDict(state_dict),
        "message_hub": {"log_scalars": {"train/loss": buffer}, "runtime_info": {"iter": 3000},
                        "resumed_keys": {"iter": True}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.004, "betas": (0.9, 0.999)}]},
        "param_schedulers": [{"last_step": 3000, "base_values": np.array([0.004])}],
    }
    path = tmp_path / "epoch_12.pth"
    torch.save(checkpoint, path)
    det = BatchDetector(resolve_config_file(RTMDET_TINY), str(path), "cpu")
    assert det.class_names == ["car", "airplane", "person"]


def test_old_zoo_style_meta_loads(tmp_path, state_dict):
    path = tmp_path / "zoo.pth"
    torch.save({"meta": {"mmdet_version": "2.0.0", "CLASSES": ("a", "b"), "epoch": 12, "config": "model = ..."},
                "state_dict": state_dict}, path)
    assert BatchDetector(resolve_config_file(RTMDET_TINY), str(path), "cpu").class_names == ["a", "b"]


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/should-not-exist",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path, state_dict):
    path = tmp_path / "evil.pth"
    torch.save({"meta": {"x": Payload()}, "state_dict": state_dict}, path)
    with pytest.raises(ModelFileError, match="outside the safe allowlist"):
        BatchDetector(resolve_config_file(RTMDET_TINY), str(path), "cpu")


@pytest.mark.parametrize("value", ["1", "true", "0", ""])
def test_torch_force_no_weights_only_load_refuses_to_start(tmp_path, state_dict, monkeypatch, value):
    """The variable turns torch.load's protection off (whatever the allowlist
    says): loading refuses instead, and says to unset it."""
    from mmdet_ls.model_files import safe_checkpoint_loading

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", value)
    with pytest.raises(ModelFileError, match="unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"), safe_checkpoint_loading():
        pass
    path = tmp_path / "zoo.pth"
    torch.save({"meta": {"x": Payload()}, "state_dict": state_dict}, path)
    with pytest.raises(ModelFileError, match="unset TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        BatchDetector(resolve_config_file(RTMDET_TINY), str(path), "cpu")
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    with pytest.raises(ModelFileError, match="outside the safe allowlist"):  # and without it, refused as usual
        BatchDetector(resolve_config_file(RTMDET_TINY), str(path), "cpu")
