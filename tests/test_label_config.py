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
        ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'/></View>", "no <RectangleLabels>"),
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
