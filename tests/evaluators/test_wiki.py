"""The second-domain corpus: MediaWiki markup stripped to prose, redirects and stubs skipped."""

import bz2

from evaluators.data import load_texts
from evaluators.wiki import ENWIKI_SAMPLE, articles, strip_markup

ARTICLE = """{{Infobox person|name=Ada {{nowrap|Lovelace}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">Some source</ref> She wrote
the first [[algorithm]] for a machine.<ref name="b"/> See [https://example.org the notes].
[[File:Ada.jpg|thumb|A portrait with [[link]] inside]]
== Early life ==
* She was born in London.
She is remembered as a pioneer of computing, and her notes on the Analytical Engine are read to this day.
{| class="wikitable"
| cell || cell
|}
[[Category:Mathematicians]]"""


def test_markup_is_stripped_to_sentences():
    text = strip_markup(ARTICLE)
    assert "Ada Lovelace was an English mathematician. She wrote" in text
    assert "the first algorithm for a machine. See the notes." in text
    assert "Early life\nShe was born in London." in text
    for leftover in ("{{", "}}", "[[", "]]", "<ref", "'''", "Category", "portrait", "wikitable", "Some source"):
        assert leftover not in text, leftover


def test_articles_skip_redirects_and_stubs(tmp_path):
    dump = tmp_path / "dump.xml.bz2"
    pages = [("#REDIRECT [[Elsewhere]]", "r"), (ARTICLE, "a"), ("Too short.", "s")]
    xml = "<mediawiki>" + "".join(
        f"<page><title>{t}</title><revision><text>{body.replace('&', '&amp;').replace('<', '&lt;')}</text>"
        "</revision></page>"
        for body, t in pages
    )
    dump.write_bytes(bz2.compress((xml + "</mediawiki>").encode()))
    found = list(articles(dump))
    assert len(found) == 1 and found[0].startswith("Ada Lovelace")
    assert load_texts(str(dump))["text"] == found  # a dump file works as a --dataset / --eval-dataset spec


def test_the_embedded_wikipedia_sample_loads_as_prose():
    texts = load_texts(ENWIKI_SAMPLE)["text"]
    assert len(texts) > 50 and texts[0].startswith("Anarchism is a political philosophy")
    assert sum("{{" in t or "[[" in t for t in texts) <= len(texts) // 10  # nearly all markup gone
