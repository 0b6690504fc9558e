"""MkDocs hook: the notebooks (in notebooks/, outside docs/) become pages of the site.

They are rendered from their saved outputs, never executed (mkdocs-jupyter with
``execute: false``).
"""

from __future__ import annotations

import pathlib

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Before mkdocs-jupyter's own on_files, which turns notebook files into pages.
@event_priority(100)
def on_files(files, config):
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        files.append(
            File(
                f"notebooks/{notebook.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
