"""Real MMDetection checkpoints for tests, built from configs shipped in mmdet.

No weights can be downloaded here, so models are randomly initialised and
saved the way a training run would save them (state_dict + dataset_meta).
"""
from __future__ import annotations

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent / "toy_detector"
TOY_CONFIG = TOY_DIR / "rtmdet_toy.py"
TOY_CHECKPOINT = TOY_DIR / "rtmdet_toy_3class.pth"
TOY_INS_CONFIG = TOY_DIR / "rtmdet_ins_toy.py"  # the same scenes, with instance masks
TOY_INS_CHECKPOINT = TOY_DIR / "rtmdet_ins_toy_3class.pth"

YOLOX_TINY = "yolox/yolox_tiny_8xb8-300e_coco.py"
RTMDET_TINY = "rtmdet/rtmdet_tiny_8xb32-300e_coco.py"
FASTER_RCNN = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"


def save_random_checkpoint(config_name: str, path: Path, seed: int = 0, init_weights: bool = False) -> Path:
    """Build the model from mmdet's shipped config and save a checkpoint."""
    import torch
    from mmdet.apis import init_detector
    from mmdet.datasets import CocoDataset
    from mmengine.config import Config

    from mmdet_ls.model_files import resolve_config_file

    torch.manual_seed(seed)
    cfg = Config.fromfile(resolve_config_file(config_name))
    # Pretrained backbones would be downloaded: start from mmdet's own init instead.
    if (cfg.model.get("backbone", {}).get("init_cfg") or {}).get("type") == "Pretrained":
        cfg.model.backbone.init_cfg = None
    model = init_detector(cfg, None, device="cpu")
    if init_weights:
        model.init_weights()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "meta": {"dataset_meta": {"classes": tuple(CocoDataset.METAINFO["classes"])}, "epoch": 0},
        },
        path,
    )
    return path
