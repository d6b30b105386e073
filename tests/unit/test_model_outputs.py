"""Whether a model predicts instance masks, from its config alone (mmdet_ls.model_outputs),
and the label-config check that uses it (label_config.check_model_outputs)."""
from pathlib import Path

import pytest

from mmdet_ls.label_config import LabelConfigError, ModelOutputs, check_model_outputs, parse_label_config
from mmdet_ls.model_outputs import config_predicts_masks, model_dict_predicts_masks

TOY = Path(__file__).resolve().parents[1] / "toy_detector"


@pytest.mark.parametrize("config", [
    "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py",
    "rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py",  # RTMDetInsSepBNHead, no mask_head key
    "solov2/solov2_r50_fpn_1x_coco.py",
    "htc/htc_r50_fpn_1x_coco.py",  # mask_head is a list, one per stage
    "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py",
    str(TOY / "rtmdet_ins_toy.py"),
])
def test_instance_segmentation_configs_predict_masks(config):
    assert config_predicts_masks(config) is True


@pytest.mark.parametrize("config", [
    "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
    "rtmdet/rtmdet_tiny_8xb32-300e_coco.py",
    "yolox/yolox_s_8xb8-300e_coco.py",
    "detr/detr_r50_8xb2-150e_coco.py",
    str(TOY / "rtmdet_toy.py"),
])
def test_box_only_configs_do_not(config):
    assert config_predicts_masks(config) is False


def _mask2former(instance_on: bool, scoped: bool = False) -> dict:
    return dict(
        type="mmdet.Mask2Former" if scoped else "Mask2Former",
        backbone=dict(type="ResNet", depth=50),
        panoptic_head=dict(type="Mask2FormerHead", num_queries=100,
                           loss_mask=dict(type="CrossEntropyLoss", use_sigmoid=True)),
        panoptic_fusion_head=dict(type="MaskFormerFusionHead"),
        test_cfg=dict(panoptic_on=True, semantic_on=False, instance_on=instance_on, max_per_image=100))


def test_mask2former_predicts_masks_only_with_instance_on():
    assert model_dict_predicts_masks(_mask2former(False)) is False
    assert model_dict_predicts_masks(_mask2former(True)) is True
    assert model_dict_predicts_masks(_mask2former(True, scoped=True)) is True
    assert model_dict_predicts_masks({**_mask2former(True), "test_cfg": None}) is False
    maskformer = {**_mask2former(False), "type": "MaskFormer"}
    assert model_dict_predicts_masks(maskformer) is False


def test_model_dicts_of_other_shapes():
    assert model_dict_predicts_masks(dict(type="MaskRCNN", roi_head=dict(
        type="StandardRoIHead", bbox_head=dict(type="Shared2FCBBoxHead"), mask_head=dict(type="FCNMaskHead"))))
    assert not model_dict_predicts_masks(dict(type="FasterRCNN", roi_head=dict(
        type="StandardRoIHead", bbox_head=dict(type="Shared2FCBBoxHead"))))
    # mask_head switched off (None, a list of None) is no mask head
    assert not model_dict_predicts_masks(dict(type="MaskRCNN", roi_head=dict(mask_head=None)))
    assert not model_dict_predicts_masks(dict(type="HybridTaskCascade", roi_head=dict(mask_head=[None, None])))
    assert model_dict_predicts_masks(dict(type="HybridTaskCascade", roi_head=dict(
        mask_head=[dict(type="HTCMaskHead"), dict(type="HTCMaskHead")])))
    assert model_dict_predicts_masks(dict(type="RTMDet", bbox_head=dict(type="mmdet.RTMDetInsSepBNHead")))
    assert not model_dict_predicts_masks(dict(type="RTMDet", bbox_head=dict(type="RTMDetSepBNHead")))


@pytest.mark.parametrize("text", [
    "custom_imports = dict(imports=['no_such_module_for_this_test'], allow_failed_imports=False)\n"
    "model = dict(type='MaskRCNN', roi_head=dict(mask_head=dict(type='FCNMaskHead')))\n",
    "model = dict(type=\n",  # not Python
    "_base_ = ['./no_such_base.py']\n",
    "train_cfg = dict()\n",  # no model
], ids=["custom_imports", "syntax", "missing_base", "no_model"])
def test_unreadable_config_is_unknown_not_an_error(tmp_path, text):
    path = tmp_path / "custom_config.py"
    path.write_text(text)
    assert config_predicts_masks(str(path)) is None
    assert config_predicts_masks(str(tmp_path / "does_not_exist.py")) is None


# --------------------------------------------------------- check_model_outputs --
ALL_KINDS = parse_label_config(
    '<View><Image name="img" value="$image"/>'
    '<RectangleLabels name="box" toName="img"><Label value="Car"/></RectangleLabels>'
    '<PolygonLabels name="outline" toName="img"><Label value="Car"/></PolygonLabels>'
    '<BrushLabels name="paint" toName="img"><Label value="Car"/></BrushLabels>'
    "</View>")
RECTANGLES_ONLY = parse_label_config(
    '<View><Image name="img" value="$image"/>'
    '<RectangleLabels name="box" toName="img"><Label value="Car"/></RectangleLabels></View>')


def test_mask_tags_with_a_box_only_model_name_the_model_and_each_tag():
    with pytest.raises(LabelConfigError) as exc:
        check_model_outputs(ALL_KINDS, ModelOutputs("faster-rcnn_r50_fpn_1x_coco", masks=False))
    message = str(exc.value)
    assert "faster-rcnn_r50_fpn_1x_coco" in message
    assert '<PolygonLabels name="outline">' in message and '<BrushLabels name="paint">' in message
    assert "RectangleLabels name=" not in message  # the rectangle tag is fine
    only_brush = parse_label_config(
        '<View><Image name="img" value="$image"/>'
        '<BrushLabels name="paint" toName="img"><Label value="Car"/></BrushLabels></View>')
    with pytest.raises(LabelConfigError, match=r'<BrushLabels name="paint">.*rtmdet_toy'):
        check_model_outputs(only_brush, ModelOutputs("rtmdet_toy", masks=False))


@pytest.mark.parametrize("masks", [True, None])
def test_mask_tags_pass_with_a_mask_model_or_an_unknown_one(masks):
    assert check_model_outputs(ALL_KINDS, ModelOutputs("m", masks=masks)) is ALL_KINDS
    assert check_model_outputs(ALL_KINDS, None) is ALL_KINDS


def test_rectangles_pass_with_a_box_only_model():
    assert check_model_outputs(RECTANGLES_ONLY, ModelOutputs("faster-rcnn_r50_fpn_1x_coco", masks=False)) \
        is RECTANGLES_ONLY


def test_config_file_drives_the_check():
    toy = ModelOutputs("rtmdet_toy", config_predicts_masks(str(TOY / "rtmdet_toy.py")))
    toy_ins = ModelOutputs("rtmdet_ins_toy", config_predicts_masks(str(TOY / "rtmdet_ins_toy.py")))
    with pytest.raises(LabelConfigError, match="rtmdet_toy"):
        check_model_outputs(ALL_KINDS, toy)
    assert check_model_outputs(ALL_KINDS, toy_ins) is ALL_KINDS
