"""The Label Studio the end-to-end tests talk to."""
import pytest
from labelstudio_server import LabelStudioServer


@pytest.fixture(scope="module")
def ls():
    """A fresh, headless Label Studio for this module (labelstudio_server.LabelStudioServer)."""
    with LabelStudioServer() as server:
        yield server
