"""Config names: MMDetection 2.x names, shipped 3.x paths and metafile model
names all resolve to the config mmdet 3 ships, with one model_version."""
import hashlib
import logging
from pathlib import Path

import pytest

from mmdet_ls.model_files import (
    ModelFileError,
    default_checkpoint_for,
    mmdet_config_dir,
    model_version,
    resolve_config_file,
    shipped_configs,
)

FASTER_RCNN = "faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
FASTER_RCNN_ZOO = (  # the seed README's checkpoint; also the metafile's Weights for the 3.x config
    "https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/"
    "faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth"
)
RTMDET_TINY = "rtmdet/rtmdet_tiny_8xb32-300e_coco.py"
RTMDET_TINY_ZOO = (
    "https://download.openmmlab.com/mmdetection/v3.0/rtmdet/rtmdet_tiny_8xb32-300e_coco/"
    "rtmdet_tiny_8xb32-300e_coco_20220902_112414-78e30dcc.pth"
)


def shipped(name: str) -> str:
    return str(mmdet_config_dir() / name)


@pytest.mark.parametrize("given, expected", [
    # The seed README's exact string: a 2.x name inside a cloned repository.
    ("mmdetection/configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py", FASTER_RCNN),
    ("faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py", FASTER_RCNN),
    ("/home/someone/mmdetection/configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py", FASTER_RCNN),
    ("mmdet::faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py", FASTER_RCNN),
    ("faster_rcnn_r50_fpn_1x_coco", FASTER_RCNN),
    ("configs/retinanet/retinanet_r50_fpn_1x_coco.py", "retinanet/retinanet_r50_fpn_1x_coco.py"),
    ("mmdetection/configs/faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py", FASTER_RCNN),
    # Bare metafile model names (and a metafile alias) select their config.
    ("rtmdet_tiny_8xb32-300e_coco", RTMDET_TINY),
    ("rtmdet-t", RTMDET_TINY),
    ("mask-rcnn_regnetx-3.2GF_fpn_ms-3x_coco", "regnet/mask-rcnn_regnetx-3.2GF_fpn_ms-3x_coco.py"),
    # Real 2.x -> 3.x renames in the shipped tree.
    ("mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py", "mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py"),
    ("mask_rcnn/mask_rcnn_r50_caffe_fpn_mstrain-poly_3x_coco.py", "mask_rcnn/mask-rcnn_r50-caffe_fpn_ms-poly-3x_coco.py"),
    ("cascade_rcnn/cascade_rcnn_r50_fpn_1x_coco.py", "cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py"),
    ("cascade_rcnn/cascade_mask_rcnn_r50_fpn_1x_coco.py", "cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py"),
    ("yolox/yolox_s_8x8_300e_coco.py", "yolox/yolox_s_8xb8-300e_coco.py"),
    ("yolo/yolov3_d53_mstrain-608_273e_coco.py", "yolo/yolov3_d53_8xb8-ms-608-273e_coco.py"),
    ("faster_rcnn/faster_rcnn_r50_fpn_mstrain_3x_coco.py", "faster_rcnn/faster-rcnn_r50_fpn_ms-3x_coco.py"),
    ("dcn/faster_rcnn_r50_fpn_dconv_c3-c5_1x_coco.py", "dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py"),
    ("detr/detr_r50_8x2_150e_coco.py", "detr/detr_r50_8xb2-150e_coco.py"),
    ("fcos/fcos_r50_caffe_fpn_gn-head_1x_coco.py", "fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py"),
])
def test_config_names_resolve_to_the_shipped_3x_config(given, expected, caplog):
    assert (mmdet_config_dir() / expected).is_file()
    caplog.set_level(logging.INFO, logger="mmdet_ls.model_files")
    assert resolve_config_file(given) == shipped(expected)
    if given.removeprefix("mmdet::") != expected:
        assert any(given in r.getMessage() and expected in r.getMessage() for r in caplog.records), caplog.text


def test_the_seed_readme_config_loads_as_faster_rcnn():
    from mmengine.config import Config

    cfg = Config.fromfile(resolve_config_file("mmdetection/configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py"))
    assert cfg.model.type == "FasterRCNN"


def test_one_model_version_for_every_name_of_a_config_and_checkpoint(tmp_path):
    names = [
        "mmdetection/configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py",
        "faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py",
        "faster_rcnn_r50_fpn_1x_coco",
        FASTER_RCNN,
        "mmdet::" + FASTER_RCNN,
        "configs/" + FASTER_RCNN,
        "faster-rcnn_r50_fpn_1x_coco",
        shipped(FASTER_RCNN),
    ]
    versions = {model_version(name, FASTER_RCNN_ZOO) for name in names}
    # The 3.x stem, and the URL hashed as before: existing deployments keep their version.
    assert versions == {"faster-rcnn_r50_fpn_1x_coco-" + hashlib.sha256(FASTER_RCNN_ZOO.encode()).hexdigest()[:12]}
    # user:password in the URL changes neither the version nor appears in it.
    with_userinfo = FASTER_RCNN_ZOO.replace("https://", "https://ann:s3cret@")
    assert model_version("faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py", with_userinfo) in versions

    ckpt = tmp_path / "rtmdet.pth"
    ckpt.write_bytes(b"weights")
    tiny = {model_version(n, str(ckpt)) for n in
            ("rtmdet_tiny_8xb32-300e_coco", "rtmdet-t", RTMDET_TINY, "mmdet::" + RTMDET_TINY, shipped(RTMDET_TINY))}
    assert tiny == {"rtmdet_tiny_8xb32-300e_coco-" + hashlib.sha256(b"weights").hexdigest()[:12]}


def test_a_config_file_of_ones_own_keeps_its_stem(tmp_path, monkeypatch):
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()[:12]
    own = tmp_path / "rtmdet_toy.py"
    own.write_text("x = 1")
    assert model_version(str(own), str(ckpt)) == f"rtmdet_toy-{digest}"
    # A local file named like a 2.x config is used as it is, under its own name.
    legacy = tmp_path / "configs" / "faster_rcnn" / "faster_rcnn_r50_fpn_1x_coco.py"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("x = 1")
    assert resolve_config_file(str(legacy)) == str(legacy.resolve())
    assert model_version(str(legacy), str(ckpt)) == f"faster_rcnn_r50_fpn_1x_coco-{digest}"
    monkeypatch.chdir(tmp_path)
    assert model_version("configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py", str(ckpt)) == \
        f"faster_rcnn_r50_fpn_1x_coco-{digest}"
    assert default_checkpoint_for(str(legacy)) is None and default_checkpoint_for(str(own)) is None


@pytest.mark.parametrize("given, close", [
    ("faster_rcnn/faster_rcnn_r50_fpn_1x_cocoo.py", FASTER_RCNN),
    ("rtmdet_tiny_8xb32_300e_coc", RTMDET_TINY),
    # A missing file of one's own is not silently swapped for the shipped config of its name.
    ("my_configs/faster-rcnn_r50_fpn_1x_coco.py", FASTER_RCNN),
    ("/srv/models/faster-rcnn_r50_fpn_1x_coco.py", FASTER_RCNN),
])
def test_an_unknown_name_fails_with_the_closest_names(given, close):
    with pytest.raises(ModelFileError, match="neither a file nor a config shipped") as err:
        resolve_config_file(given)
    listed = str(err.value).split("closest names: ", 1)[1].split(", ")
    assert close in listed and len(listed) <= 5
    with pytest.raises(ModelFileError, match="closest names"):
        default_checkpoint_for(given)
    assert model_version(given, "/nonexistent.pth").startswith(Path(given).stem + "-")


def test_a_name_of_two_shipped_configs_asks_for_one():
    with pytest.raises(ModelFileError, match="more than one") as err:
        resolve_config_file("grounding_dino_swin-t_pretrain_odinw13")
    assert "mm_grounding_dino/odinw/" in str(err.value) and "grounding_dino/odinw/" in str(err.value)
    assert resolve_config_file("mm_grounding_dino/grounding_dino_swin-t_pretrain_odinw13") == \
        shipped("mm_grounding_dino/odinw/grounding_dino_swin-t_pretrain_odinw13.py")


@pytest.mark.parametrize("given, url", [
    ("rtmdet_tiny_8xb32-300e_coco", RTMDET_TINY_ZOO),
    ("mmdet::" + RTMDET_TINY, RTMDET_TINY_ZOO),
    ("mmdetection/configs/faster_rcnn/faster_rcnn_r50_fpn_1x_coco.py", FASTER_RCNN_ZOO),
    (FASTER_RCNN, FASTER_RCNN_ZOO),
    ("_base_/models/faster-rcnn_r50_fpn.py", None),  # shipped, but no model of the zoo
])
def test_default_checkpoint_is_the_zoo_weights_of_the_config(given, url):
    assert default_checkpoint_for(given) == url


def test_default_checkpoints_agree_with_mmengine_hub():
    """mmengine.hub.get_config(..., pretrained=True) reads model_path from the same metafiles."""
    from mmengine.config.utils import _get_cfg_metainfo

    package = str(mmdet_config_dir().parent.parent)
    for config in (FASTER_RCNN, RTMDET_TINY, "retinanet/retinanet_r50_fpn_1x_coco.py", "yolox/yolox_s_8xb8-300e_coco.py"):
        assert default_checkpoint_for(config) == _get_cfg_metainfo(package, config)["Weights"]


def test_the_index_reads_the_models_mmengine_inferencers_read():
    """Every model DetInferencer can name (Name or Alias) resolves to its metafile Config."""
    from mmengine.infer.infer import BaseInferencer

    mim = BaseInferencer._get_repo_or_mim_dir("mmdet")
    assert Path(mim) / "configs" == mmdet_config_dir()
    stems = {p.name.removesuffix(".py"): p.relative_to(mmdet_config_dir()).as_posix()
             for p in mmdet_config_dir().rglob("*.py")}
    checked = 0
    for model in BaseInferencer._get_models_from_metafile(mim):
        config = model["Config"].removeprefix("configs/")
        if not (mmdet_config_dir() / config).is_file():
            continue  # a few metafiles name a config that is not shipped under that path
        for name in [model["Name"], *model.get("Alias", [])]:
            if name in stems and stems[name] != config:
                continue  # a model named like another shipped config file: the file of that name wins
            try:
                found = resolve_config_file(name)
            except ModelFileError as exc:
                assert "more than one" in str(exc)  # grounding_dino vs mm_grounding_dino copies
                continue
            assert found == shipped(config), name
            checked += 1
    assert checked > 500
    assert shipped_configs() is shipped_configs()  # built once per process
