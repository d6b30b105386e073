"""Parse a Label Studio labeling config (XML) into what the detector needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

# Tag names are case-insensitive in Label Studio's own parser. Each kind is
# also the region `type` Label Studio expects for it (lowercase tag name).
REGION_TAGS = {"rectanglelabels": "RectangleLabels", "polygonlabels": "PolygonLabels", "brushlabels": "BrushLabels"}
MASK_KINDS = frozenset({"polygonlabels", "brushlabels"})  # filled from instance masks
_IMAGE_TAGS = {"image"}
MAX_CONFIG_BYTES = 1_000_000
# Caps that keep one config from multiplying the answer: every region tag gets
# its own regions for the same detections, and its name, its image's name and
# the label value are repeated in every region it produces.
MAX_REGION_TAGS = 16  # per config, all kinds together
MAX_NAME_CHARS = 256  # name, toName (the image's name) and <Label value>


class LabelConfigError(ValueError):
    """The label config cannot be used for pre-annotation by this backend."""


@dataclass(frozen=True)
class LabelSpec:
    value: str
    # Detector class names that turn into this label (`predicted_values`);
    # defaults to the label's own value.
    predicted_values: tuple[str, ...]


@dataclass(frozen=True)
class RegionTarget:
    """One region tag (<RectangleLabels>, <PolygonLabels> or <BrushLabels>)
    and the <Image> it annotates."""

    from_name: str
    to_name: str
    image_key: str  # key in task["data"] that holds the image URL
    labels: tuple[LabelSpec, ...]
    score_threshold: float | None = None  # per-tag `model_score_threshold`
    kind: str = "rectanglelabels"  # a REGION_TAGS key: the region type

    @property
    def tag(self) -> str:
        """How the user wrote it, for messages: <PolygonLabels name="...">."""
        return f'<{REGION_TAGS[self.kind]} name="{self.from_name}">'

    @property
    def needs_masks(self) -> bool:
        return self.kind in MASK_KINDS


@dataclass(frozen=True)
class ParsedLabelConfig:
    targets: tuple[RegionTarget, ...] = field(default_factory=tuple)

    @property
    def mask_targets(self) -> tuple[RegionTarget, ...]:
        return tuple(t for t in self.targets if t.needs_masks)

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Distinct task data keys holding images, in config order."""
        return tuple(dict.fromkeys(t.image_key for t in self.targets))


@dataclass(frozen=True)
class ModelOutputs:
    """What the served model predicts, known from its config at start-up."""

    name: str  # as the user named it: the config file's stem
    masks: bool | None  # pred_instances carry instance masks (None: unknown, checked per image)


def check_model_outputs(config: ParsedLabelConfig, model: ModelOutputs | None) -> ParsedLabelConfig:
    """LabelConfigError when a tag needs what the model does not predict."""
    if model is not None and model.masks is False and config.mask_targets:
        tags = ", ".join(t.tag for t in config.mask_targets)
        raise LabelConfigError(
            f"{tags} needs instance masks, and the model {model.name} predicts boxes only (its config has no mask "
            "head): serve an instance-segmentation model (e.g. Mask R-CNN, RTMDet-Ins) or use <RectangleLabels>"
        )
    return config


def _iter(root: Element):
    yield root
    for child in root:
        yield from _iter(child)


def _split_values(raw: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in raw.split(",") if v.strip())


def _parse_threshold(raw: str | None, tag: str) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise LabelConfigError(
            f'{tag}: model_score_threshold="{raw}" is not a number'
        ) from None
    if not 0.0 <= value <= 1.0:
        raise LabelConfigError(
            f'{tag}: model_score_threshold={value} must be between 0 and 1'
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
    region_tags: list[tuple[str, Element]] = []
    for el in _iter(root):
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        if tag in _IMAGE_TAGS and el.get("name"):
            images[el.get("name")] = el.get("value", "")
        elif tag in REGION_TAGS:
            region_tags.append((tag, el))

    if not region_tags:
        raise LabelConfigError(
            "label config has no <RectangleLabels>, <PolygonLabels> or <BrushLabels> tag: this backend predicts "
            'boxes and instance masks, add e.g. <RectangleLabels name="label" toName="image"> with <Label> children'
        )

    if len(region_tags) > MAX_REGION_TAGS:
        raise LabelConfigError(
            f"label config has {len(region_tags)} region tags (<RectangleLabels>, <PolygonLabels>, <BrushLabels>); "
            f"at most {MAX_REGION_TAGS} are supported in one config (each tag repeats every detection as its own "
            "regions)"
        )

    targets = []
    for kind, el in region_tags:
        name = el.get("name")
        to_name = el.get("toName")
        if not name or not to_name:
            raise LabelConfigError(f"<{REGION_TAGS[kind]}> needs both name and toName attributes")
        if len(name) > MAX_NAME_CHARS:
            raise LabelConfigError(
                f"<{REGION_TAGS[kind]} name=...> is {len(name)} characters long; at most {MAX_NAME_CHARS} allowed"
            )
        tag = f'<{REGION_TAGS[kind]} name="{name}">'
        # toName may list several comma-separated objects; boxes go to the first image.
        image_name = next((n.strip() for n in to_name.split(",") if n.strip() in images), None)
        if image_name is None:
            raise LabelConfigError(
                f'<{REGION_TAGS[kind]} name="{name}" toName="{to_name}"> does not point to an <Image> tag'
            )
        if len(image_name) > MAX_NAME_CHARS:
            raise LabelConfigError(
                f'{tag}: its <Image> name is {len(image_name)} characters long; '
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
                    f'{tag}: a <Label value=...> is {len(label_value)} characters long; '
                    f"at most {MAX_NAME_CHARS} allowed"
                )
            predicted = _split_values(child.get("predicted_values") or "") or (label_value,)
            labels.append(LabelSpec(value=label_value, predicted_values=predicted))
        if not labels:
            raise LabelConfigError(f'{tag} has no <Label value="..."> children')
        targets.append(
            RegionTarget(
                from_name=name,
                to_name=image_name,
                image_key=value[1:],
                labels=tuple(labels),
                score_threshold=_parse_threshold(el.get("model_score_threshold"), tag),
                kind=kind,
            )
        )
    return ParsedLabelConfig(targets=tuple(targets))
