"""The built book: a clean build with warnings as errors, a self-contained site (scripts, fonts
and the math renderer served from the site itself, so it works offline and on hubs without
internet), internal links and cross-references that resolve, JupyterHub launch links, no math
left unrendered, figures in the shared style (book/figstyle.py), and sources cited by author and
year, never as "seed NNN".

The build itself is the session fixture `built_book` in conftest.py.
"""

from __future__ import annotations

import importlib.util
import posixpath
import re
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

# `<link rel=...>` values that only describe a relation; every other rel (stylesheet, icon,
# preload, prefetch, preconnect, manifest...) makes the browser fetch or connect.
NAVIGATION_RELS = {"index", "search", "next", "prev", "canonical", "alternate", "author",
                   "license", "help", "copyright", "up", "top", "first", "last"}
# Attributes from which the browser fetches something as soon as the page loads.
LOAD_ATTRS = {"script": ("src",), "img": ("src", "srcset"), "source": ("src", "srcset"),
              "iframe": ("src",), "embed": ("src",), "object": ("data",),
              "video": ("src", "poster"), "audio": ("src",), "track": ("src",),
              "input": ("src",), "image": ("href", "xlink:href"), "use": ("href", "xlink:href")}


class Page(HTMLParser):
    """What one HTML page defines (ids), links to (<a href>) and makes the browser load."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.anchors: list[str] = []
        self.loads: list[tuple[str, str]] = []  # (tag and attribute, url)
        self.inline_scripts: list[str] = []
        self.styles: list[str] = []  # <style> bodies and style="..." attributes
        self.has_math = False
        self._inside: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "name" in a:
            self.ids.add(a["name"])
        if "style" in a:
            self.styles.append(a["style"])
        self.has_math |= "math" in a.get("class", "").split()
        if tag == "a" and "href" in a:
            self.anchors.append(a["href"])
        if tag == "link" and "href" in a:
            rels = set(a.get("rel", "").lower().split())
            if not rels or not rels <= NAVIGATION_RELS:
                self.loads.append((f"<link rel={a.get('rel', '')!r} href>", a["href"]))
        for attr in LOAD_ATTRS.get(tag, ()):
            if attr in a:
                urls = ([c.split()[0] for c in a[attr].split(",") if c.strip()]
                        if attr == "srcset" else [a[attr]])
                self.loads += [(f"<{tag} {attr}>", u) for u in urls]
        if tag == "script" and "src" not in a:
            self._inside = "script"
        elif tag == "style":
            self._inside = "style"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside == "script":
            self.inline_scripts.append(data)
        elif self._inside == "style":
            self.styles.append(data)


def is_external(url: str) -> bool:
    """True for a URL that leaves the site: another host, or a network scheme."""
    u = urlsplit(url.strip())
    return bool(u.netloc) or u.scheme.lower() in {"http", "https", "ftp", "ws", "wss"}


def read_site(html: Path) -> dict[str, Page]:
    """Every page of a built site, keyed by its path relative to the site root.

    `_static/*.html` are the theme's template leftovers, not pages, and are left out.
    """
    return {p.relative_to(html).as_posix(): Page(p.read_text(encoding="utf-8"))
            for p in sorted(html.rglob("*.html")) if p.relative_to(html).parts[0] != "_static"}


def css_urls(css: str) -> list[str]:
    """The targets of url(...) and @import in a stylesheet, comments removed."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    found = re.findall(r"""url\(\s*(?:"([^"]*)"|'([^']*)'|([^)'"\s]*))\s*\)""", css)
    found += [(m,) for m in re.findall(r"""@import\s+["']([^"']+)["']""", css)]
    return [next(g for g in groups if g) for groups in found if any(groups)]


def external_loads(html: Path, pages: dict[str, Page]) -> list[str]:
    """Everything any page, inline style or served stylesheet would fetch from another host."""
    bad = [f"{name}: {what} {url}" for name, page in pages.items()
           for what, url in page.loads if is_external(url)]
    bad += [f"{name}: style url {url}" for name, page in pages.items()
            for style in page.styles for url in css_urls(style) if is_external(url)]
    bad += [f"{css.relative_to(html)}: url {url}" for css in sorted(html.rglob("*.css"))
            for url in css_urls(css.read_text(encoding="utf-8", errors="replace"))
            if is_external(url)]
    return bad


def external_script_references(pages: dict[str, Page]) -> list[str]:
    """Other hosts named in inline scripts (which could fetch from them)."""
    return [f"{name}: inline script names {url}" for name, page in pages.items()
            for script in page.inline_scripts
            for url in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`<>]*", script)]


def broken_internal_links(html: Path, pages: dict[str, Page]) -> tuple[list[str], int]:
    """Internal <a href>s and loads whose file or #fragment is missing; and how many
    fragment links were checked."""
    bad, fragments = [], 0
    parsed = dict(pages)
    for name, page in pages.items():
        refs = [("<a href>", h) for h in page.anchors] + page.loads
        for what, ref in refs:
            u = urlsplit(ref)
            if u.scheme or u.netloc:
                continue
            path = unquote(u.path)
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), path)) \
                if path else name
            if target.startswith("../") or not (html / target).is_file():
                bad.append(f"{name}: {what} {ref} -> {target} does not exist")
                continue
            if what == "<a href>" and u.fragment and target.endswith(".html"):
                if target not in parsed:
                    parsed[target] = Page((html / target).read_text(encoding="utf-8"))
                fragments += 1
                if unquote(u.fragment) not in parsed[target].ids:
                    bad.append(f"{name}: {what} {ref} -> no id {unquote(u.fragment)!r} in {target}")
    return bad, fragments


def toc_files() -> list[str]:
    """Every `file:` of _toc.yml, in order."""
    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                yield str(node["file"])
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    return [str(toc["root"]), *walk({k: v for k, v in toc.items() if k != "root"})]


def launch_pages() -> list[str]:
    """The labs listed in the toc; before any is listed, a chapter (chapters are MyST
    notebooks, so they get launch buttons too)."""
    docs = [re.sub(r"\.(ipynb|md)$", "", f) for f in toc_files()]
    return [d for d in docs if d.startswith("labs/")] or ["book/ch01_learning"]


@pytest.fixture(scope="module")
def pages(built_book) -> dict[str, Page]:
    return read_site(built_book.html)


def test_intro_page_is_built(built_book):
    html = (built_book.html / "book" / "intro.html").read_text()
    assert "Optimization for Deep Learning" in html
    assert (built_book.html / "index.html").exists()


def test_build_passes_with_warnings_as_errors(built_book):
    problems = [ln for ln in built_book.log.splitlines()
                if re.search(r"\b(WARNING|ERROR|CRITICAL):|undefined label|unknown document", ln)]
    assert not problems, f"{len(problems)} warnings, first ones:\n" + "\n".join(problems[:40])
    assert built_book.returncode == 0, built_book.log[-4000:]


def test_every_chapter_in_the_toc_is_built(built_book):
    missing = [f for f in toc_files()
               if not (built_book.html / re.sub(r"\.(ipynb|md)$", "", f)).with_suffix(".html")
               .is_file()]
    assert not missing


def test_every_page_names_the_icon_the_site_serves(built_book, pages):
    checked = 0
    for name, page in pages.items():
        if 'http-equiv="Refresh"' in (built_book.html / name).read_text(encoding="utf-8"):
            continue  # the root index.html only redirects to the first chapter
        checked += 1
        icons = [url for what, url in page.loads if what == "<link rel='icon' href>"]
        assert len(icons) == 1, f"{name}: {len(icons)} icon links"
        assert ((built_book.html / name).parent / icons[0]).resolve().is_file(), (name, icons)
    assert checked >= len(toc_files())


def test_hidden_folders_are_not_read_as_pages(tmp_path):
    """`.pytest_cache/README.md` (left by a plain `pytest` run) must not end up in the book,
    or `jupyter-book build -W` fails on "document isn't included in any toctree". Sphinx finds
    the sources with get_matching_files and the configured exclude_patterns."""
    from sphinx.util.matching import get_matching_files

    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    for rel in (".pytest_cache/README.md", ".hypothesis/x.md", ".venv/lib/x.md",
                "labs/.ipynb_checkpoints/lab1-checkpoint.ipynb", "book/ch01.md", "labs/lab1.ipynb"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("# x\n")
    found = set(get_matching_files(tmp_path, exclude_patterns=config["exclude_patterns"]))
    assert found == {"book/ch01.md", "labs/lab1.ipynb"}


def test_pages_with_math_use_the_mathjax_served_by_the_site(built_book, pages):
    with_math = [name for name, page in pages.items() if page.has_math]
    assert "book/intro.html" in with_math and "book/ch01_learning.html" in with_math
    for name in with_math:
        scripts = [url for what, url in pages[name].loads if what == "<script src>"]
        mathjax = [posixpath.normpath(posixpath.join(posixpath.dirname(name), urlsplit(u).path))
                   for u in scripts if "mathjax" in u.lower()]
        assert mathjax == ["_static/mathjax/tex-chtml.js"], (name, scripts)
    fonts = built_book.html / "_static/mathjax/output/chtml/fonts/woff-v2"
    assert len(list(fonts.glob("*.woff"))) > 10, "MathJax's CHTML fonts are not served"


def test_no_page_loads_scripts_styles_fonts_or_images_from_another_host(built_book, pages):
    assert not external_loads(built_book.html, pages)


def test_inline_scripts_name_no_other_host(pages):
    # sphinx-thebe's `const THEBE_JS_URL = "https://unpkg.com/thebe@0.8.2/lib/index.js"` was
    # one: _config.yml leaves sphinx_thebe out (see the next test).
    assert not external_script_references(pages)


def test_sphinx_extensions_are_jupyter_books_without_thebe():
    """_config.yml's `sphinx.config.extensions` replaces Jupyter Book's default list: it must
    keep every default but sphinx_thebe, and every extension of `sphinx.extra_extensions`."""
    from jupyter_book.config import get_default_sphinx_config, get_final_config

    config, _ = get_final_config(user_yaml=ROOT / "_config.yml", sourcedir=ROOT,
                                 cli_config={"latex_individualpages": False})
    extensions = config["extensions"]
    extra = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"].get(
        "extra_extensions", [])
    assert "sphinx_thebe" not in extensions
    wanted = [e for e in get_default_sphinx_config()["extensions"] if e != "sphinx_thebe"]
    assert [e for e in extensions if e in wanted] == wanted
    assert not [e for e in [*extra, "sphinxcontrib.bibtex"] if e not in extensions]
    local = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"].get(
        "local_extensions", {})
    assert "labkit_hub" in local and not [e for e in local if e not in extensions]


def test_internal_links_and_fragments_resolve(built_book, pages):
    bad, fragments = broken_internal_links(built_book.html, pages)
    assert not bad, "\n".join(bad[:30])
    assert fragments > 100  # the sidebars and the in-page tables of contents alone have more


def test_the_site_checks_catch_offenders(tmp_path):
    """The checks above flag each kind of offender on a small made-up site."""
    (tmp_path / "book").mkdir()
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static/site.css").write_text(
        "/* url(https://in-a-comment.example) */"
        " @font-face { src: url('https://fonts.gstatic.com/x.woff2') }"
        " .a { background: url(\"data:image/svg+xml,<svg xmlns='http://www.w3.org/2000/svg'/>\") }")
    a = (
        '<link rel="stylesheet" href="../_static/site.css"><link rel="next" href="b.html">'
        '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Lato">'
        '<script src="//cdn.example.org/x.js"></script>'
        '<img srcset="i.png 1x, https://e.org/i.png 2x">'
        '<div style="background: url(https://e.org/bg.png)"></div>'
        '<script>const THEBE_JS_URL = "https://unpkg.com/thebe@0.8.2/lib/index.js"</script>'
        '<script>fetch("https://api.example.com/v1")</script>'
        '<a href="https://elsewhere.example.org/">a hyperlink is fine</a>'
        '<a href="b.html#there">ok</a><a href="b.html#nowhere">bad fragment</a>'
        '<a href="c.html">missing</a><span id="here"></span><a href="#here">ok</a>'
        '<a href="#gone">bad</a>'
    )
    (tmp_path / "book/a.html").write_text(a)
    (tmp_path / "book/i.png").write_bytes(b"")
    (tmp_path / "book/b.html").write_text('<p id="there">b</p>')
    pages = read_site(tmp_path)
    assert [x.split(" ")[-1] for x in external_loads(tmp_path, pages)] == [
        "https://fonts.googleapis.com/css?family=Lato", "//cdn.example.org/x.js",
        "https://e.org/i.png", "https://e.org/bg.png", "https://fonts.gstatic.com/x.woff2"]
    assert [x.split(" ")[-1] for x in external_script_references(pages)] == [
        "https://unpkg.com/thebe@0.8.2/lib/index.js", "https://api.example.com/v1"]
    bad, fragments = broken_internal_links(tmp_path, pages)
    assert fragments == 4
    flagged = [re.search(r"<a href> (\S+)", b)[1] for b in bad]
    assert flagged == ["b.html#nowhere", "c.html", "#gone"]


@pytest.mark.parametrize("docname", launch_pages())
def test_notebook_page_launches_on_the_jupyterhub_with_nbgitpuller(pages, docname):
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    hub = config["launch_buttons"]["jupyterhub_url"].rstrip("/")
    repo_url = config["repository"]["url"]
    branch = config["repository"].get("branch", "main")
    ui = {"jupyterlab": "lab/tree", "classic": "tree"}[
        config["launch_buttons"].get("notebook_interface", "classic")]
    source = next(ROOT / f"{docname}{ext}" for ext in (".ipynb", ".md")
                  if (ROOT / f"{docname}{ext}").exists())

    prefix = f"{hub}/hub/user-redirect/git-pull?"
    links = [h for h in pages[f"{docname}.html"].anchors if h.startswith(prefix)]
    assert len(links) == 1, f"{docname}.html has {len(links)} links starting with {prefix}"
    query = parse_qs(urlsplit(links[0]).query)
    assert set(query) == {"repo", "urlpath", "branch"}
    assert query["repo"] == [repo_url] and query["branch"] == [branch]
    # nbgitpuller clones into a folder named after the repository; the link opens the page's
    # own notebook inside it.
    clone = f"{ui}/{PurePosixPath(urlsplit(repo_url).path).name}/"
    urlpath = query["urlpath"][0]
    assert urlpath == clone + source.relative_to(ROOT).as_posix()  # no "./" or "//" in it


# ---------------------------------------------------------------------------------------------
# Math that MathJax will not typeset: the HTML must hold formulas only inside the elements of
# class "math" that the build writes (MathJax is told to look nowhere else).
# ---------------------------------------------------------------------------------------------

EM_OPEN, EM_CLOSE = "\x01", "\x02"  # where <em> and </em> were, in VisibleText.text
BLOCKS = {"p", "li", "div", "td", "th", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "br",
          "figcaption", "caption", "section", "table", "tr", "ul", "ol", "dl", "blockquote"}


class VisibleText(HTMLParser):
    """The text a reader sees as prose: without code, scripts, styles, SVG and typeset math
    (elements of class "math"), with the positions of <em> and </em> marked, and the title and
    alt attributes (tooltips) collected separately."""

    SKIP_TAGS = {"script", "style", "pre", "code", "kbd", "samp", "textarea", "svg", "noscript"}
    SKIP_CLASSES = {"math", "highlight"}

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.tooltips: list[str] = []
        self._skip: tuple[str, int] | None = None  # (tag that opened the skipped part, depth)
        self.feed(text)
        self.close()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if self._skip is not None:
            if tag == self._skip[0]:
                self._skip = (tag, self._skip[1] + 1)
            return
        self.tooltips += [a[k] for k in ("title", "alt") if a.get(k)]
        if tag in self.SKIP_TAGS or self.SKIP_CLASSES & set(a.get("class", "").split()):
            self._skip = (tag, 1)
        elif tag == "em":
            self.parts.append(EM_OPEN)
        elif tag in BLOCKS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip is None:
            a = {k: v or "" for k, v in attrs}
            self.tooltips += [a[k] for k in ("title", "alt") if a.get(k)]
            if tag in BLOCKS:
                self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self._skip is not None:
            if tag == self._skip[0]:
                depth = self._skip[1] - 1
                self._skip = None if depth == 0 else (tag, depth)
            return
        if tag == "em":
            self.parts.append(EM_CLOSE)
        elif tag in BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip is None:
            self.parts.append(data)


UNRENDERED = [
    ("a dollar sign (TeX delimiter)", re.compile(r"\$")),
    ("a TeX delimiter \\( \\) \\[ \\]", re.compile(r"\\[()\[\]]")),
    ("a TeX command", re.compile(r"\\(?:[A-Za-z]+|[{}|,;!])")),
    ("math split by <em> (an underscore read as emphasis)",
     re.compile(f"[\\w}}^_]{EM_OPEN}|{EM_CLOSE}[\\w{{^_]")),
]


def unrendered_math(html: str) -> list[str]:
    """Every place where TeX would reach the reader as raw text: a description and the context."""
    page = VisibleText(html)
    found = []
    for where, text in [("text", page.text)] + [("tooltip", t) for t in page.tooltips]:
        for what, pattern in UNRENDERED:
            if where == "tooltip" and pattern is UNRENDERED[3][1]:
                continue
            for m in pattern.finditer(text):
                context = text[max(0, m.start() - 50): m.end() + 30]
                context = context.replace(EM_OPEN, "<em>").replace(EM_CLOSE, "</em>")
                found.append(f"{what} in the {where}: ...{' '.join(context.split())}...")
    return found


def test_no_math_is_left_unrendered(built_book, pages):
    bad = [f"{name}: {problem}" for name in pages
           for problem in unrendered_math((built_book.html / name).read_text(encoding="utf-8"))]
    assert not bad, f"{len(bad)} places, first ones:\n" + "\n".join(bad[:20])


def test_the_math_check_catches_offenders():
    fine = (
        '<p>fine: <span class="math notranslate nohighlight">\\(\\mathcal{G}_T\\)</span> and '
        '<code>$x$</code> and <em>emphasis</em>, here.</p>'
        '<div class="math notranslate nohighlight"><span>\\[x_{t+1} = x_t\\]</span></div>'
        '<div class="highlight"><pre>r"$\\eta$"</pre></div><svg><text>$y$</text></svg>'
        '<a title="Nesterov, rate O(1/k²)" href="#r">[N83]</a>'
    )
    assert unrendered_math(fine) == []
    bad = (
        '<p>raw dollars $O(1/k^2)$ in a title.</p>'
        '<li><p>(SHB) $\\mathcal{G}<em>T \\le V</em>{\\mathrm{SHB}}$</p></li>'
        '<p>an escaped \\(x\\) formula</p>'
        '<a title="Nesterov, rate $O(1/k^2)$" href="#r">[N83]</a>'
    )
    found = unrendered_math(bad)
    assert any("dollar" in f and "O(1/k^2)" in f and "text" in f for f in found)
    assert any("dollar" in f and "tooltip" in f for f in found)
    assert any("TeX command" in f and "mathcal" in f for f in found)
    assert any("split by <em>" in f for f in found)
    assert any("delimiter" in f and "escaped" in f for f in found)


# ---------------------------------------------------------------------------------------------
# Sources: cited by author and year with a bibliography entry, never as "seed NNN".
# ---------------------------------------------------------------------------------------------

SEED_WORDS = re.compile(r"\bseed\s*0\d\d\b", re.IGNORECASE)
#: The bibliography entries of the five source documents of the course (book/references.bib).
SOURCE_KEYS = ("anon-power-eta-thesis", "sato2024talk", "yang2019optimization",
               "suzuki2020seminar", "anon-momentum-article")


def test_no_seed_numbers_in_the_book_labs_or_package():
    files = [p for folder in ("book", "labs", "labkit") for p in sorted((ROOT / folder).rglob("*"))
             if p.is_file() and p.suffix in {".md", ".py", ".ipynb", ".bib", ".yml", ".js"}
             and ".ipynb_checkpoints" not in p.parts]
    files += [ROOT / "_toc.yml", ROOT / "_config.yml"]
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in files
           for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if SEED_WORDS.search(line)]
    assert not bad, "\n".join(bad)
    assert SEED_WORDS.search("as in Seed 004") and not SEED_WORDS.search("manual_seed(0)")


def test_every_source_document_has_an_entry_and_is_cited():
    bib = (ROOT / "book/references.bib").read_text(encoding="utf-8")
    chapters = "".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "book").glob("*.md")))
    for key in SOURCE_KEYS:
        entry = re.search(r"@\w+\{" + re.escape(key) + r",(.*?)\n\}", bib, re.S)
        assert entry, f"no bibliography entry {key}"
        for field in ("author", "title", "howpublished"):
            assert re.search(rf"^\s*{field}\s*=", entry[1], re.M), f"{key} has no {field}"
        # a year, or a note that says the document has none
        assert re.search(r"^\s*(year\s*=|note\s*=\s*\{Undated)", entry[1], re.M), key
        assert re.search(r"`[^`]*\b" + re.escape(key) + r"\b[^`]*`", chapters), f"{key} never cited"


def test_the_source_entries_show_in_the_bibliography(built_book):
    text = (built_book.html / "book/references.html").read_text(encoding="utf-8")
    for words in ("Anonymous (Meiji University)", "Sen Yang", "Taiji Suzuki",
                  "momentum does not reduce stochastic noise", "arXiv:2402.02325v1"):
        assert words.lower() in text.lower(), words


# ---------------------------------------------------------------------------------------------
# Figures: every chapter uses the shared style, whose checks run when the chapter is built.
# ---------------------------------------------------------------------------------------------


def chapter_sources() -> dict[str, str]:
    return {f: (ROOT / f"{f}.md").read_text(encoding="utf-8") for f in toc_files()
            if f.startswith("book/") and (ROOT / f"{f}.md").exists()}


def figstyle_module():
    spec = importlib.util.spec_from_file_location("figstyle", ROOT / "book/figstyle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_figure_cell_uses_the_shared_style():
    checked = 0
    for name, text in chapter_sources().items():
        cells = re.findall(r"```\{code-cell\}[^\n]*\n(.*?)\n```", text, re.S)
        figures = [c for c in cells if "figure:" in c and "caption:" in c]
        assert "plt.show()" not in text, f"{name}: use figstyle.show(fig), which checks the figure"
        if figures:
            assert "figstyle.use()" in text, f"{name} draws figures without figstyle.use()"
        for cell in figures:
            assert "figstyle.show(fig)" in cell, f"{name}: a figure cell without figstyle.show"
            checked += 1
    assert checked >= 25


def test_the_figure_checks_catch_offenders():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figstyle = figstyle_module()
    with matplotlib.rc_context(figstyle.STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(figstyle.WIDTH, 3))
        axes[0].plot([0, 1], [0, 1], label="a")
        axes[0].legend()
        axes[1].plot([0, 1], [1, 0])
        axes[1].set_xlabel("time")
        assert figstyle.check(fig) == ["panel 'time' has no legend"]
        axes[1].legend(["b"])
        assert figstyle.check(fig) == []
        fig.set_figwidth(2 * figstyle.PAGE_WIDTH_IN)  # shown at half size: 10 pt becomes 5 pt
        assert any("pt at the page width" in p for p in figstyle.check(fig))
        fig.set_figwidth(figstyle.WIDTH)
        axes[0].set_title("small", fontsize=7)
        assert [p for p in figstyle.check(fig) if "'small'" in p]
        with pytest.raises(ValueError, match="breaks the book's figure rules"):
            figstyle.show(fig)
        plt.close("all")


def test_chapter_figures_are_svg(built_book, pages):
    images = [url for name, page in pages.items() if name.startswith("book/")
              for what, url in page.loads if what == "<img src>" and "_images/" in url]
    assert len(images) >= 25
    assert not [u for u in images if not u.endswith(".svg")]


def test_interactive_figures_are_served_by_the_site(built_book):
    for page in ("book/ch06_smoothing.html", "book/ch07_graduated.html"):
        html = (built_book.html / page).read_text(encoding="utf-8")
        assert html.count('class="labkit-interactive"') == 1, page
        assert "_static/labkit-interactive.js" in html and "_static/labkit-interactive.css" in html
    assert (built_book.html / "_static/labkit-interactive.js").is_file()


# ---------------------------------------------------------------------------------------------
# The Labs page: the student notebooks for download, and the note while the hub is a placeholder
# ---------------------------------------------------------------------------------------------


def _hub_extension():
    spec = importlib.util.spec_from_file_location("labkit_hub", ROOT / "book/_ext/labkit_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_placeholder_hubs_are_recognized():
    hub = _hub_extension()
    for url in ("", "   ", None, "https://hub.example.edu", "https://example.org/", "hub",
                "https://jupyter.example", "http://hub.test:8000", "https://x.invalid",
                "http://localhost:8000", "https://HUB.EXAMPLE.COM."):
        assert hub.is_placeholder_hub(url), url
    for url in ("https://hub.university.edu", "https://jupyter.cs.example-university.org",
                "https://datahub.berkeley.edu/"):
        assert not hub.is_placeholder_hub(url), url


def test_the_labs_page_offers_every_student_notebook_for_download(built_book, pages):
    """A plain link per student notebook (labs/*.ipynb), served from the site itself, whatever
    the launch buttons' hub; each link's file is the committed student version."""
    students = sorted((ROOT / "labs").glob("*.ipynb"))
    assert students
    links = [h for h in pages["book/labs.html"].anchors if "_downloads/" in h]
    for student in students:
        hits = [h for h in links if unquote(urlsplit(h).path).endswith(f"/{student.name}")]
        assert len(hits) == 1, f"book/labs.html has {len(hits)} download links to {student.name}"
        served = built_book.html / posixpath.normpath(posixpath.join("book", hits[0]))
        assert served.read_bytes() == student.read_bytes(), f"{served} is not {student}"


def test_the_labs_page_notes_a_placeholder_hub(built_book):
    """The note is computed when the book is built (book/_ext/labkit_hub.py), from the same
    setting as the launch links: shown while the hub is a placeholder, absent otherwise."""
    hub = _hub_extension()
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["launch_buttons"]["jupyterhub_url"]
    page = (built_book.html / "book/labs.html").read_text(encoding="utf-8")
    assert ("labkit-hub-note" in page) == hub.is_placeholder_hub(url)
    if hub.is_placeholder_hub(url):
        assert "No JupyterHub is set up for this copy of the book." in page
        assert f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{url}" in page
    assert "No JupyterHub" not in (ROOT / "book/labs.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("url, shown", [("https://hub.example.edu", True), ("", True),
                                        ("https://hub.university.edu", False)])
def test_the_hub_note_follows_the_setting(tmp_path, url, shown):
    """The directive alone, in a one-page Sphinx project: the hub is read from the build's
    configuration (as Jupyter Book passes launch_buttons to the theme)."""
    from sphinx.application import Sphinx

    (tmp_path / "conf.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'book/_ext')!r})\n"
        "extensions = ['labkit_hub']\n"
        f"html_theme_options = {{'launch_buttons': {{'jupyterhub_url': {url!r}}}}}\n")
    (tmp_path / "index.rst").write_text("Labs\n====\n\n.. labs-hub-note::\n\nThe table.\n")
    app = Sphinx(tmp_path, tmp_path, tmp_path / "out", tmp_path / "doctrees", "html",
                 status=None, warning=None, freshenv=True)
    app.build()
    page = (tmp_path / "out/index.html").read_text(encoding="utf-8")
    assert ("No JupyterHub is set up" in page) == shown
    assert "The table." in page
