from mmdet_ls.label_config import LabelSpec, RegionTarget, parse_label_config
from mmdet_ls.label_mapping import build_label_map, normalize_class_name

# The labels as the original (seed) backend's README lists them.
SEED_COCO_LABELS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag "
    "tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
    "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
    "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
).split()


def test_all_80_seed_labels_map_to_mmdet3_coco_classes():
    from mmdet.datasets import CocoDataset

    mmdet_classes = CocoDataset.METAINFO["classes"]
    assert len(SEED_COCO_LABELS) == 80 == len(mmdet_classes)
    labels = "".join(f'<Label value="{name.title()}" predicted_values="{name}"/>' for name in SEED_COCO_LABELS)
    cfg = parse_label_config(
        f'<View><Image name="image" value="$image"/><RectangleLabels name="l" toName="image">{labels}</RectangleLabels></View>'
    )
    label_map = build_label_map(cfg.targets[0])
    mapped = {c: label_map.get(normalize_class_name(c)) for c in mmdet_classes}
    assert all(mapped.values()), [c for c, v in mapped.items() if not v]
    assert mapped["cell phone"] == "Cell_Phone"
    assert mapped["hair drier"] == "Hair_Drier"
    assert len(set(mapped.values())) == 80


def test_several_classes_into_one_label_and_normalisation():
    target = RegionTarget(
        "l", "i", "image",
        (LabelSpec("Vehicle", ("car", "Truck ", "motor_cycle")), LabelSpec("Car", ("car",))),
    )
    m = build_label_map(target)
    assert m[normalize_class_name("car")] == "Vehicle"  # first label wins on conflicts
    assert m[normalize_class_name("TRUCK")] == "Vehicle"
    assert m[normalize_class_name("motor cycle")] == "Vehicle"
    assert normalize_class_name("  Cell__Phone ") == "cell phone"
    assert normalize_class_name("person") not in m
