"""What /setup tells the backend about a project, kept for later /predict calls."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .image_sources import LabelStudioAccess
from .label_config import LabelConfigError, ModelOutputs, ParsedLabelConfig, check_model_outputs, parse_label_config
from .lru import BoundedLRU

MAX_PROJECTS = 256  # /setup entries kept (least recently set up dropped); each holds a label config


@lru_cache(maxsize=128)
def _cached_label_config(xml: str) -> ParsedLabelConfig:
    return parse_label_config(xml)


def cached_label_config(xml: str, model: ModelOutputs | None = None) -> ParsedLabelConfig:
    """Parsed config; LabelConfigError for anything the parser chokes on, and
    for a tag that needs what `model` does not predict."""
    try:
        return check_model_outputs(_cached_label_config(xml), model)
    except LabelConfigError:
        raise
    except RecursionError:
        raise LabelConfigError("label config is nested too deeply") from None
    except (UnicodeError, ValueError) as exc:  # e.g. a lone surrogate (\ud800) from the JSON body
        raise LabelConfigError(f"label config is not valid text: {type(exc).__name__}") from None


def project_key(project) -> str:
    """Label Studio sends "<id>.<created_at epoch>"; projects are kept by id."""
    return str(project).split(".")[0][:100] if project is not None else ""


@dataclass(frozen=True)
class ProjectSetup:
    access: LabelStudioAccess | None  # from /setup's hostname and access_token
    label_config: str


class Projects:
    """Project id -> its last /setup, at most `max_projects` of them."""

    def __init__(self, max_projects: int = MAX_PROJECTS):
        self._setups: BoundedLRU[str, ProjectSetup] = BoundedLRU(max_projects)

    def remember(self, project, access: LabelStudioAccess | None, label_config: str) -> None:
        key = project_key(project)
        if key:
            self._setups.put(key, ProjectSetup(access, label_config))

    def _setup(self, project) -> ProjectSetup | None:
        # A /predict does not count as a use: the order is the order of /setup calls.
        return self._setups.peek(project_key(project)) if project else None

    def label_config(self, project) -> str | None:
        setup = self._setup(project)
        return setup.label_config if setup else None

    def access(self, project) -> LabelStudioAccess | None:
        setup = self._setup(project)
        return setup.access if setup else None

    def __len__(self) -> int:
        return len(self._setups)
