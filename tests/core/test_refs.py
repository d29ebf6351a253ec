import pytest

from quiver.errors import InvalidReference
from quiver.refs import AdapterRef, parse_ref


@pytest.mark.parametrize("text,expected", [
    ("news", AdapterRef("news")),
    ("news/3", AdapterRef("news", version=3)),
    ("acme/news/12", AdapterRef("acme/news", version=12)),
    ("acme/news", AdapterRef("acme/news")),
    ("news@prod", AdapterRef("news", alias="prod")),
    ("news@latest", AdapterRef("news")),
    ("news@" + "ab" * 20, AdapterRef("news", revision="ab" * 20)),
])
def test_parse(text, expected):
    ref = parse_ref(text)
    assert ref == expected
    assert parse_ref(str(ref)) == ref


@pytest.mark.parametrize("text", ["", "News", "a/b/c/d", "123", "x/0", "../etc", "x@", "x@Prod",
                                  "a b", "x/" + "y" * 200])
def test_invalid(text):
    with pytest.raises(InvalidReference):
        parse_ref(text)
