"""Sphinx configuration of optclip's API reference (built in CI with warnings as errors:
``python -m sphinx -W --keep-going -b html docs docs/_build``)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "optclip"
author = "the optclip authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.autosummary"]
# Docstrings follow optax's Google style: Args, Returns, Raises, Example, References.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # NamedTuple fields: documented once, by their Attributes section
napoleon_custom_sections = [("References", "notes_style")]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
# `name` in a docstring links where Sphinx knows the name and is plain code otherwise.
default_role = "py:obj"
html_theme = "alabaster"
exclude_patterns = ["_build"]
