import pytest

from mmdet_ls.label_config import LabelConfigError, parse_label_config

SEED_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image" model_score_threshold="0.3">
    <Label value="Airplane" predicted_values="airplane"/>
    <Label value="Car" predicted_values=" car , truck "/>
    <Label value="person"/>
  </RectangleLabels>
</View>
"""


def test_parses_seed_style_config():
    cfg = parse_label_config(SEED_CONFIG)
    (target,) = cfg.targets
    assert (target.from_name, target.to_name, target.image_key) == ("label", "image", "image")
    assert target.score_threshold == 0.3
    assert [(l.value, l.predicted_values) for l in target.labels] == [
        ("Airplane", ("airplane",)),
        ("Car", ("car", "truck")),
        ("person", ("person",)),  # no predicted_values: the label's own value
    ]


def test_multiple_rectangle_image_pairs():
    cfg = parse_label_config(
        """<View>
          <Image name="front" value="$front_url"/>
          <Image name="back" value="$back_url"/>
          <RectangleLabels name="front_boxes" toName="front"><Label value="Car"/></RectangleLabels>
          <View><RectangleLabels name="back_boxes" toName="back"><Label value="Person"/></RectangleLabels></View>
        </View>"""
    )
    assert [(t.from_name, t.to_name, t.image_key) for t in cfg.targets] == [
        ("front_boxes", "front", "front_url"),
        ("back_boxes", "back", "back_url"),
    ]
    assert cfg.image_keys == ("front_url", "back_url")


@pytest.mark.parametrize(
    "xml, message",
    [
        ("", "empty"),
        ("<View><Image name='i' value='$i'/>", "not valid XML"),
        ("not xml at all", "not valid XML"),
        ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'/></View>", "no <RectangleLabels>, <PolygonLabels> or <BrushLabels>"),
        ("<View><RectangleLabels name='l' toName='nope'><Label value='a'/></RectangleLabels></View>",
         "does not point to an <Image>"),
        ("<View><Image name='i' value='$i'/><RectangleLabels name='l' toName='i'/></View>", "no <Label"),
        ("<View><Image name='i' value='$i'/><RectangleLabels toName='i'><Label value='a'/></RectangleLabels></View>",
         "needs both name and toName"),
        ("<View><Image name='i' value='$i'/><RectangleLabels name='l' toName='i' model_score_threshold='x'>"
         "<Label value='a'/></RectangleLabels></View>", "not a number"),
    ],
)
def test_unusable_configs_get_clear_errors(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_entity_expansion_is_refused():
    billion_laughs = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<View><Image name="image" value="$image"/><RectangleLabels name="l" toName="image"><Label value="&lol3;"/></RectangleLabels></View>"""
    with pytest.raises(LabelConfigError, match="forbidden XML features"):
        parse_label_config(billion_laughs)


def test_external_entity_is_refused():
    xxe = """<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>
<View><Image name="image" value="$image"/><RectangleLabels name="l" toName="image"><Label value="&e;"/></RectangleLabels></View>"""
    with pytest.raises(LabelConfigError, match="forbidden XML features"):
        parse_label_config(xxe)


def _rectangles(n: int, name_len: int = 1, label: str = "Car") -> str:
    tags = "".join(
        f'<RectangleLabels name="{"l" * name_len}{i}" toName="image"><Label value="{label}"/></RectangleLabels>'
        for i in range(n)
    )
    return f'<View><Image name="image" value="$image"/>{tags}</View>'


def test_region_tags_are_capped_per_config_all_kinds_together():
    from mmdet_ls.label_config import MAX_REGION_TAGS

    assert MAX_REGION_TAGS == 16
    assert len(parse_label_config(_rectangles(16)).targets) == 16
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(_rectangles(17))
    assert str(info.value) == (
        "label config has 17 region tags (<RectangleLabels>, <PolygonLabels>, <BrushLabels>); at most 16 are "
        "supported in one config (each tag repeats every detection as its own regions)"
    )
    mixed = _rectangles(15).replace("</View>", '<PolygonLabels name="p" toName="image"><Label value="Car"/>'
                                    '</PolygonLabels><BrushLabels name="b" toName="image"><Label value="Car"/>'
                                    "</BrushLabels></View>")
    with pytest.raises(LabelConfigError, match="has 17 region tags"):
        parse_label_config(mixed)
    with pytest.raises(LabelConfigError, match="has 5000 region tags"):
        parse_label_config(_rectangles(5000))


def test_polygon_and_brush_tags_are_targets_of_their_kind():
    config = parse_label_config(
        '<View><Image name="img" value="$image"/>'
        '<RectangleLabels name="box" toName="img"><Label value="Car" predicted_values="car,truck"/></RectangleLabels>'
        '<polygonlabels name="outline" toName="img" model_score_threshold="0.7"><Label value="Person"/>'
        "</polygonlabels>"
        '<BrushLabels name="paint" toName="img"><Label value="Plane" predicted_values="airplane"/></BrushLabels>'
        "</View>")
    assert [(t.from_name, t.kind, t.needs_masks) for t in config.targets] == [
        ("box", "rectanglelabels", False), ("outline", "polygonlabels", True), ("paint", "brushlabels", True)]
    assert [t.from_name for t in config.mask_targets] == ["outline", "paint"]
    assert config.targets[1].score_threshold == 0.7 and config.targets[1].tag == '<PolygonLabels name="outline">'
    assert config.targets[2].labels[0].predicted_values == ("airplane",)
    with pytest.raises(LabelConfigError, match='<BrushLabels name="b"> has no <Label'):
        parse_label_config('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"/></View>')


def test_names_repeated_in_every_region_are_capped():
    """name, the image's name and each label value travel in every region."""
    from mmdet_ls.label_config import MAX_NAME_CHARS

    assert parse_label_config(_rectangles(1, name_len=MAX_NAME_CHARS - 1)).targets[0].from_name == "l" * 255 + "0"
    with pytest.raises(LabelConfigError, match=r"<RectangleLabels name=\.\.\.> is 257 characters long; at most 256"):
        parse_label_config(_rectangles(1, name_len=MAX_NAME_CHARS))
    with pytest.raises(LabelConfigError, match=r"a <Label value=\.\.\.> is 300 characters long; at most 256"):
        parse_label_config(_rectangles(1, label="x" * 300))
    long_image = "i" * 300
    with pytest.raises(LabelConfigError, match="its <Image> name is 300 characters long; at most 256"):
        parse_label_config(f'<View><Image name="{long_image}" value="$image"/><RectangleLabels name="l" '
                           f'toName="{long_image}"><Label value="Car"/></RectangleLabels></View>')
