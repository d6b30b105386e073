"""What a model predicts, read from its config alone (no weights, no model
build): /setup must answer within Label Studio's 3 s and never loads a model."""
from __future__ import annotations

import logging
from functools import lru_cache

from .model_files import resolve_config_file

logger = logging.getLogger(__name__)

# Dense heads that predict instance masks without a `mask_head` key in the config.
_MASK_DENSE_HEADS = frozenset({"RTMDetInsHead", "RTMDetInsSepBNHead"})
# Query-based detectors: instance masks only when test_cfg.instance_on.
_QUERY_DETECTORS = frozenset({"Mask2Former", "MaskFormer"})


def _type_name(node: dict) -> str:
    t = node.get("type", "")
    return t.rsplit(".", 1)[-1] if isinstance(t, str) else getattr(t, "__name__", "")


def model_dict_predicts_masks(model: dict) -> bool:
    """True when an mmdet 3.x model config gives `pred_instances.masks`:
    a `mask_head` anywhere (Mask R-CNN family, SOLO, CondInst, YOLACT, ...),
    an RTMDet-Ins head, or Mask2Former/MaskFormer with instance_on."""
    if _type_name(model) in _QUERY_DETECTORS:
        return bool((model.get("test_cfg") or {}).get("instance_on"))
    stack = [model]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            mask_head = node.get("mask_head")  # a dict, or one per stage (HTC, QueryInst)
            if (isinstance(mask_head, dict) or (isinstance(mask_head, (list, tuple)) and any(mask_head))
                    or _type_name(node) in _MASK_DENSE_HEADS):
                return True
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


@lru_cache(maxsize=8)
def config_predicts_masks(config_file: str) -> bool | None:
    """model_dict_predicts_masks of a config file (a path, or any name
    resolve_config_file takes); None when the config cannot be read here
    (then a mask tag is checked per image: the Postprocess answers an error
    item when the model returned no masks)."""
    from mmengine.config import Config

    try:
        cfg = Config.fromfile(resolve_config_file(config_file))
        return model_dict_predicts_masks(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model))
    except Exception as exc:  # e.g. custom_imports only the Detector's node has
        logger.warning("could not read %s to tell whether the model predicts masks (%s: %s); checked per image",
                       config_file, type(exc).__name__, exc)
        return None
