"""Build step beyond pyproject.toml: the optional C trunk-capture callback.

``optional=True``: without a C compiler the install still succeeds and
mtpcode uses the (slower) Python callback; `mtpcode models --info`... see README.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mtpcode._capture", ["mtpcode/_capture.c"], optional=True)])
