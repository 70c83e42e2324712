"""The Labs page's note about the JupyterHub (book: the labs, ``book/labs.md``).

A Sphinx extension with one directive, ``labs-hub-note``. The launch buttons of the lab pages
open the JupyterHub named by one setting, ``launch_buttons.jupyterhub_url`` in ``_config.yml``.
While that setting is a placeholder (empty, or a host in an example domain such as
``hub.example.edu``), the directive renders a note saying so and pointing at the download
links; once a real hub is set, it renders nothing. The note is decided when the book is built,
from the same setting the launch links use, so it cannot disagree with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

#: Top-level domains reserved for examples and tests (RFC 2606, RFC 6761): never a real hub.
RESERVED_TLDS = frozenset({"example", "invalid", "localhost", "test"})


def is_placeholder_hub(url: str | None) -> bool:
    """Whether ``url`` is no real JupyterHub: empty, without a host, or a host with a label
    ``example`` (``hub.example.edu``, ``example.org``) or a reserved top-level domain."""
    host = (urlsplit((url or "").strip()).hostname or "").lower().rstrip(".")
    if not host:
        return True
    labels = host.split(".")
    return "example" in labels or labels[-1] in RESERVED_TLDS


def hub_url(config: Any) -> str:
    """The hub of the launch buttons, as Jupyter Book passes it to the theme."""
    options = getattr(config, "html_theme_options", None) or {}
    return str((options.get("launch_buttons") or {}).get("jupyterhub_url") or "")


class HubNote(SphinxDirective):
    """``labs-hub-note``: a note while the launch buttons' hub is a placeholder, else nothing."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        # Re-read the page when the book's configuration changes.
        self.env.note_dependency(str(Path(self.env.srcdir) / "_config.yml"))
        hub = hub_url(self.config)
        if not is_placeholder_hub(hub):
            return []
        shown = hub or "(none)"
        first = nodes.paragraph()
        first += nodes.strong(text="No JupyterHub is set up for this copy of the book.")
        first += nodes.Text(" The launch buttons of the lab pages lead to ")
        first += nodes.literal(text=shown)
        first += nodes.Text(", a placeholder, so they will not open a lab. Download a lab from "
                            "the table below and open it in JupyterLab, or clone the repository "
                            "and open its ")
        first += nodes.literal(text="labs/")
        first += nodes.Text(" folder.")
        second = nodes.paragraph()
        second += nodes.Text("Instructors: set ")
        second += nodes.literal(text="launch_buttons.jupyterhub_url")
        second += nodes.Text(" in ")
        second += nodes.literal(text="_config.yml")
        second += nodes.Text(" to your hub and rebuild the book; this note then disappears.")
        note = nodes.note("", first, second, classes=["labkit-hub-note"])
        return [note]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("labs-hub-note", HubNote)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
