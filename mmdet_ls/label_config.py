"""Parse a Label Studio labeling config (XML) into what the detector needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

# Tag names are case-insensitive in Label Studio's own parser.
_RECTANGLE_TAGS = {"rectanglelabels"}
_IMAGE_TAGS = {"image"}
MAX_CONFIG_BYTES = 1_000_000
# Caps that keep one config from multiplying the answer: every <RectangleLabels>
# tag gets its own regions for the same detections, and its name, its image's
# name and the label value are repeated in every region it produces.
MAX_RECTANGLE_TAGS = 16  # per config
MAX_NAME_CHARS = 256  # name, toName (the image's name) and <Label value>


class LabelConfigError(ValueError):
    """The label config cannot be used for bounding-box pre-annotation."""


@dataclass(frozen=True)
class LabelSpec:
    value: str
    # Detector class names that turn into this label (`predicted_values`);
    # defaults to the label's own value.
    predicted_values: tuple[str, ...]


@dataclass(frozen=True)
class RectangleTarget:
    """One <RectangleLabels> tag and the <Image> it annotates."""

    from_name: str
    to_name: str
    image_key: str  # key in task["data"] that holds the image URL
    labels: tuple[LabelSpec, ...]
    score_threshold: float | None = None  # per-tag `model_score_threshold`


@dataclass(frozen=True)
class ParsedLabelConfig:
    targets: tuple[RectangleTarget, ...] = field(default_factory=tuple)

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Distinct task data keys holding images, in config order."""
        return tuple(dict.fromkeys(t.image_key for t in self.targets))


def _iter(root: Element):
    yield root
    for child in root:
        yield from _iter(child)


def _split_values(raw: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in raw.split(",") if v.strip())


def _parse_threshold(raw: str | None, tag_name: str) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise LabelConfigError(
            f'<RectangleLabels name="{tag_name}">: model_score_threshold="{raw}" is not a number'
        ) from None
    if not 0.0 <= value <= 1.0:
        raise LabelConfigError(
            f'<RectangleLabels name="{tag_name}">: model_score_threshold={value} must be between 0 and 1'
        )
    return value


def parse_label_config(xml: str) -> ParsedLabelConfig:
    """Parse `xml` with a hardened parser (no entities, no external refs).

    Raises LabelConfigError with a message meant for the Label Studio user.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label config is empty")
    if len(xml.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise LabelConfigError(f"label config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        root = SafeET.fromstring(xml, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise LabelConfigError(
            f"label config uses forbidden XML features ({type(exc).__name__}): DTDs and entities are not allowed"
        ) from None
    except SafeET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from None

    images: dict[str, str] = {}
    rectangles: list[Element] = []
    for el in _iter(root):
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        if tag in _IMAGE_TAGS and el.get("name"):
            images[el.get("name")] = el.get("value", "")
        elif tag in _RECTANGLE_TAGS:
            rectangles.append(el)

    if not rectangles:
        raise LabelConfigError(
            "label config has no <RectangleLabels> tag: this backend predicts bounding boxes, "
            'add e.g. <RectangleLabels name="label" toName="image"> with <Label> children'
        )

    if len(rectangles) > MAX_RECTANGLE_TAGS:
        raise LabelConfigError(
            f"label config has {len(rectangles)} <RectangleLabels> tags; at most {MAX_RECTANGLE_TAGS} are "
            "supported in one config (each tag repeats every detection as its own regions)"
        )

    targets = []
    for el in rectangles:
        name = el.get("name")
        to_name = el.get("toName")
        if not name or not to_name:
            raise LabelConfigError("<RectangleLabels> needs both name and toName attributes")
        if len(name) > MAX_NAME_CHARS:
            raise LabelConfigError(
                f"<RectangleLabels name=...> is {len(name)} characters long; at most {MAX_NAME_CHARS} allowed"
            )
        # toName may list several comma-separated objects; boxes go to the first image.
        image_name = next((n.strip() for n in to_name.split(",") if n.strip() in images), None)
        if image_name is None:
            raise LabelConfigError(
                f'<RectangleLabels name="{name}" toName="{to_name}"> does not point to an <Image> tag'
            )
        if len(image_name) > MAX_NAME_CHARS:
            raise LabelConfigError(
                f'<RectangleLabels name="{name}">: its <Image> name is {len(image_name)} characters long; '
                f"at most {MAX_NAME_CHARS} allowed"
            )
        value = images[image_name]
        if not value.startswith("$") or len(value) < 2:
            raise LabelConfigError(
                f'<Image name="{image_name}" value="{value}">: value must reference task data, e.g. "$image"'
            )
        labels = []
        for child in el:
            if not isinstance(child.tag, str) or child.tag.lower() != "label":
                continue
            label_value = (child.get("value") or "").strip()
            if not label_value:
                continue
            if len(label_value) > MAX_NAME_CHARS:
                raise LabelConfigError(
                    f'<RectangleLabels name="{name}">: a <Label value=...> is {len(label_value)} characters long; '
                    f"at most {MAX_NAME_CHARS} allowed"
                )
            predicted = _split_values(child.get("predicted_values") or "") or (label_value,)
            labels.append(LabelSpec(value=label_value, predicted_values=predicted))
        if not labels:
            raise LabelConfigError(f'<RectangleLabels name="{name}"> has no <Label value="..."> children')
        targets.append(
            RectangleTarget(
                from_name=name,
                to_name=image_name,
                image_key=value[1:],
                labels=tuple(labels),
                score_threshold=_parse_threshold(el.get("model_score_threshold"), name),
            )
        )
    return ParsedLabelConfig(targets=tuple(targets))
