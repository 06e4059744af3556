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
