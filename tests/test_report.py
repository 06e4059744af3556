from scratchlm.report import markdown_to_html, table, write_report


def test_report_html_renders_markdown_properly(tmp_path):
    body = "**'And God said,'** (greedy)\n```\nAnd God said, <b>let</b> there be\n```\n\n" + \
        table([["a|b", "**x**"]], ["metric", "value"]) + "\n\n![loss curve](loss.png)"
    write_report(tmp_path, "t", [("Samples", body)])
    html = (tmp_path / "report.html").read_text()
    assert "<strong>'And God said,'</strong>" in html and "**" not in html
    assert "&lt;b&gt;let&lt;/b&gt;" in html and "<b>let</b>" not in html   # model text is never raw HTML
    assert "<td>a|b</td>" in html and "<td><strong>x</strong></td>" in html  # a '|' in a cell stays in its cell
    assert '<img src="loss.png" alt="loss curve"' in html
    assert "<h2>Samples</h2>" in markdown_to_html("## Samples", "t")


def test_samples_with_fences_or_html_stay_verbatim_in_markdown_and_html(tmp_path):
    """A model's sample (or prompt) holding ``` or <script> must not close the code block early or
    become markup: parsed as Markdown *with* raw HTML allowed (as other viewers do), every sample is
    exactly one code block's content, the prompt heading is plain text, and the sections after
    the samples survive."""
    from markdown_it import MarkdownIt
    from scratchlm.report import samples_section
    p = "<script>alert(1)</script> **x** `"
    greedy, sampled = "\n```\n## Not a heading\n````python\n<img src=x onerror=alert(2)>", " plain ``` end"
    body = samples_section({"greedy": {p: greedy}, "sampled": {p: sampled}})
    write_report(tmp_path, "t", [("Samples", body), ("Timings", table([["train", "1 s"]], ["stage", "time"]))])
    md = (tmp_path / "report.md").read_text()
    tokens = MarkdownIt("commonmark", {"html": True}).enable("table").parse(md)
    assert [t.content.rstrip("\n") for t in tokens if t.type == "fence"] == [p + greedy, p + sampled]
    assert not [t for t in tokens if t.type.startswith("html")]
    assert all(c.type != "html_inline" for t in tokens if t.children for c in t.children)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == ["t", "Samples", "Timings"]
    strong = [c for t in tokens if t.children for c in t.children if c.type == "text" and "script" in c.content]
    assert strong and strong[0].content == repr(p)  # the prompt reads as itself, escapes undone
    page = (tmp_path / "report.html").read_text()
    assert "<script" not in page and "<img" not in page and page.count("&lt;script&gt;") == 4
    assert "<h2>Timings</h2>" in page and "<td>train</td>" in page
