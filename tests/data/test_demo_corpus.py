"""The embedded demo corpus (megatron_emo.data.demo_corpus): three real, offline domains."""


from megatron_emo.data import demo_corpus
from megatron_emo.data.demo_corpus import DOMAINS, MIN_DOCUMENT_CHARS, demo_documents

GUTENBERG_MARKERS = ("*** START OF", "*** END OF", "START: FULL LICENSE", "8868.txt", "www.gutenberg.org")
"""Lines of the Project Gutenberg header, footer and licence around the book."""


def _botchan_body() -> str:
    text = demo_corpus.BOTCHAN.read_text(encoding="utf-8-sig")
    start = text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")
    end = text.index("*** END OF THIS PROJECT GUTENBERG EBOOK")
    return text[text.index("\n", start) + 1 : end]


def test_three_domains_each_with_many_real_documents(demo_docs):
    assert tuple(demo_docs) == DOMAINS == ("code", "docs", "prose")
    for domain, documents in demo_docs.items():
        assert len(documents) >= 50, (domain, len(documents))
        assert all(isinstance(doc, str) and len(doc) >= MIN_DOCUMENT_CHARS for doc in documents), domain
    # clearly different domains: no document is in two of them
    code, docs, prose = (set(demo_docs[d]) for d in DOMAINS)
    assert not (code & docs) and not (code & prose) and not (docs & prose)


def test_deterministic_across_calls(demo_docs):
    assert demo_documents() == demo_docs


def test_code_documents_are_python_source(demo_docs):
    for i, doc in enumerate(demo_docs["code"]):
        compile(doc, f"<demo code {i}>", "exec")  # a SyntaxError fails the test
    assert sum("def " in doc or "class " in doc for doc in demo_docs["code"]) >= 0.9 * len(demo_docs["code"])


def test_docs_are_python_reference_text(demo_docs):
    from pydoc_data.topics import topics

    docs = demo_docs["docs"]
    assert topics["for"].strip() in docs and topics["if"].strip() in docs  # language reference
    import json

    assert any(doc.startswith(json.dumps.__doc__.strip()[:40]) for doc in docs)  # module docstrings
    assert sum("Return" in doc or "return" in doc for doc in docs) > len(docs) / 3


def test_prose_is_passages_of_botchan(demo_docs):
    body = _botchan_body()
    prose = demo_docs["prose"]
    assert all(passage in body for passage in prose)  # verbatim passages of the book's text
    joined = "\n".join(prose)
    assert "Because of an hereditary recklessness, I have been playing always a" in joined  # chapter I
    assert "Kiyo" in joined and "Porcupine" in joined
    # the passages cover the book: most of its text is in them
    assert len(joined) > 0.9 * len(body.strip())


def test_prose_has_no_gutenberg_header_footer_or_licence(demo_docs):
    for i, passage in enumerate(demo_docs["prose"]):
        for line in passage.splitlines():
            assert not any(marker in line for marker in GUTENBERG_MARKERS), (i, line)
            assert "Project Gutenberg License" not in line, (i, line)


def test_prose_has_no_gutenberg_credit_or_end_lines(demo_docs):
    for i, passage in enumerate(demo_docs["prose"]):
        for line in passage.splitlines():
            assert "Gutenberg" not in line and not line.startswith("Produced by"), (i, line)
