"""Secrets come from the environment and travel only with their own host."""
import pytest
from model_fixtures import TOY_CHECKPOINT, TOY_CONFIG

from mmdet_ls.credentials import (
    ConfigError,
    access_for,
    basic_auth_setting,
    operator_access,
    setup_access,
)
from mmdet_ls.image_sources import LabelStudioAccess

ENV = ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOSTNAME", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN",
       "LABEL_STUDIO_API_KEY_FILE", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "BASIC_AUTH_PASS_FILE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_a_key_without_a_url_refuses_to_start_and_says_what_to_set(monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "abc123")
    with pytest.raises(ConfigError, match="set LABEL_STUDIO_URL"):
        operator_access(None)
    from serve_app import AppArgs, build_app

    with pytest.raises(ConfigError, match="set LABEL_STUDIO_URL"):
        build_app(AppArgs(config_file=str(TOY_CONFIG), checkpoint_file=str(TOY_CHECKPOINT)))


def test_operator_key_belongs_to_the_operator_url(monkeypatch, tmp_path):
    monkeypatch.setenv("LABEL_STUDIO_HOSTNAME", "http://ls.internal:8080/")
    key_file = tmp_path / "key"
    key_file.write_text("abc123\n")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY_FILE", str(key_file))
    access = operator_access(None)
    assert access.base.origin == ("http", "ls.internal", 8080) and access.api_key == "abc123"
    assert "abc123" not in repr(access)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LABEL_STUDIO_URL": "http://a:8080", "LABEL_STUDIO_HOSTNAME": "http://b:8080"}, "both set and differ"),
        ({"LABEL_STUDIO_URL": "http://a", "LABEL_STUDIO_API_KEY": "k1", "LABEL_STUDIO_ACCESS_TOKEN": "k2"},
         "both set and differ"),
        ({"LABEL_STUDIO_URL": "http://a\\@b", "LABEL_STUDIO_API_KEY": "k1"}, "backslash"),
        ({"LABEL_STUDIO_URL": "http://a", "LABEL_STUDIO_API_KEY": "k1\r\nX: 1"}, "not a Label Studio key"),
    ],
)
def test_contradicting_or_unusable_settings_refuse_to_start(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        operator_access(None)


def test_basic_auth_needs_both_user_and_password(monkeypatch):
    assert basic_auth_setting(None) is None
    with pytest.raises(ConfigError, match="BASIC_AUTH_PASS is not set"):
        basic_auth_setting("labeler")
    monkeypatch.setenv("BASIC_AUTH_PASS", "pw")
    with pytest.raises(ConfigError, match="BASIC_AUTH_USER"):
        basic_auth_setting(None)
    assert basic_auth_setting("labeler") == ("labeler", "pw")


@pytest.mark.parametrize("arg", ["label_studio_api_key", "basic_auth_pass"])
def test_secrets_are_not_app_args(arg):
    from serve_app import AppArgs

    with pytest.raises(ValueError, match="is a secret and not an app arg"):
        AppArgs(**{arg: "s3cret"})
    with pytest.raises(ValueError):
        AppArgs(score_treshold=0.3)  # misspelt: refused, not silently ignored


def test_a_setup_token_goes_only_with_its_own_hostname():
    operator_with_key = LabelStudioAccess.from_text("http://ls:8080", "operator-key")
    operator_no_key = LabelStudioAccess.from_text("http://ls:8080")
    same_host = setup_access("http://ls:8080", "setup-token")
    other_host = setup_access("http://attacker:8080", "setup-token")
    assert access_for(operator_with_key, other_host) is operator_with_key
    assert access_for(operator_with_key, same_host) is operator_with_key
    assert access_for(operator_no_key, same_host) is same_host
    assert access_for(operator_no_key, other_host) is operator_no_key  # no key goes anywhere
    assert access_for(None, other_host) is other_host  # its own token, to its own host
    assert access_for(None, None) is None


@pytest.mark.parametrize(
    "hostname, token",
    [("javascript:alert(1)", "t"), ("http://a\\@b", "t"), ("http://" + "a" * 3000, "t"), ("http://ls", "a\r\nb"),
     ("http://ls", "x" * 5000), (123, "t"), (None, "t"), ("http://u:p@ls", "t"), ("http://ls", 5)],
)
def test_bad_setup_values_are_refused(hostname, token):
    with pytest.raises(ValueError):
        setup_access(hostname, token)
