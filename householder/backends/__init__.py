"""Backends: one module per array library, each exposing ``load()``.

A backend implements the small set of primitives listed in
:class:`householder.backends._base.Backend`; the representation logic
(blocking, composition, transposition) lives once, in the core.
"""
