"""The one URL parser: what it refuses, and that its reading is the one connected to."""
import pytest

from mmdet_ls.failures import TaskError
from mmdet_ls.urls import parse_url, redact_text


@pytest.mark.parametrize(
    "text, why",
    [
        ("http://attacker\\@label-studio:8080/data/upload/1/a.png", "backslash"),
        ("http://label-studio:8080\\@attacker/x.png", "backslash"),
        ("http://a/x\\y.png", "backslash"),
        ("http://a/x\r\nX-Injected: 1", "control characters"),
        ("http://a/x\x00.png", "control characters"),
        ("http://a\t.com/x", "control characters"),
        ("http://exa mple.com/x", "whitespace in its host"),
        ("http://a@b@c/x", "more than one '@'"),
        ("http://127.1/x", "ambiguous numeric host"),
        ("http://0x7f.0.0.1/x", "ambiguous numeric host"),
        ("http://2130706433/x", "ambiguous numeric host"),
        ("http://017.0.0.1/x", "ambiguous numeric host"),
        ("http://[::1/x", "malformed IPv6"),
        ("http://[fe80::1%25eth0]/x", "malformed IPv6"),
        ("http://a.com:99999/x", "invalid port"),
        ("http://a.com:8x/x", "invalid port"),
        ("http://a.com:1:2/x", "more than one ':'"),
        ("http://exämple.com/x", "not ASCII"),
        ("http:///x", "no host"),
        ("http:x.png", "no host"),
        ("ftp://a.com/x", "unsupported URL scheme"),
        ("/data/upload/1/a.png", "not an absolute URL"),
    ],
)
def test_ambiguous_or_malformed_urls_are_refused(text, why):
    with pytest.raises(TaskError) as err:
        parse_url(text)
    assert err.value.failure.reason == "bad_url"
    assert why in err.value.failure.message


def test_what_is_parsed_is_what_is_connected_to():
    url = parse_url("HTTPS://User:pw@Images.Example.COM:8443/a/../b/./c d.png?x=1 2#frag")
    assert (url.scheme, url.host, url.port) == ("https", "images.example.com", 8443)
    assert url.target == "/b/c%20d.png?x=1%202"  # spaces encoded, dot segments gone, no fragment
    assert url.userinfo == "User:pw"
    assert url.host_header == "images.example.com:8443"
    assert url.redacted() == "https://images.example.com:8443/b/c%20d.png"  # no userinfo, no query
    assert "pw" not in repr(url)
    v6 = parse_url("http://[::ffff:169.254.169.254]/x")
    assert v6.host == "::ffff:a9fe:a9fe" and v6.host_header == "[::ffff:a9fe:a9fe]"


def test_file_names_with_spaces_and_unicode_keep_working():
    url = parse_url("http://a.com/my photos/été 1.png?name=a b")
    assert url.target == "/my%20photos/%C3%A9t%C3%A9%201.png?name=a%20b"
    assert parse_url("http://a.com/already%20encoded.png").target == "/already%20encoded.png"
    assert parse_url("http://a.com/100%.png").target == "/100%25.png"


def test_redirects_resolve_against_the_parsed_url():
    base = parse_url("http://ls:8080/data/upload/1/a.png?sig=1")
    assert base.join("/b.png").without_userinfo() == "http://ls:8080/b.png"
    assert base.join("b.png").target == "/data/upload/1/b.png"
    assert base.join("../../../../api/x").target == "/api/x"
    assert base.join("//other/x").origin == ("http", "other", 80)
    with pytest.raises(TaskError, match="backslash"):
        base.join("http://attacker\\@ls:8080/x")
    with pytest.raises(TaskError, match="ambiguous numeric host"):
        base.join("http://0177.0.0.1/")


def test_redact_text_hides_userinfo_and_queries_of_unparsable_text():
    assert redact_text("http://user:secret@[::1/x?X-Amz-Signature=abc") == "http://[::1/x"
    assert redact_text("/data/upload/1/a.png?token=t") == "/data/upload/1/a.png"
    assert redact_text("a\r\nb") == "a\\r\\nb"
