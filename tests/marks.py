"""Splitting a parametrized test between the default suite and ``-m slow``.

Each case of these lists starts a command in a subprocess (several seconds of Python and JAX start-up on a 2-core
machine). The default suite keeps the first cases, one per behaviour; the rest run with ``-m slow`` before every
release, with the same assertions (README "Tests").
"""

import pytest
from _pytest.mark.structures import ParameterSet


def slow_after(cases, keep: int = 1, *, unpack: bool = True) -> list:
    """``cases`` with every case after the first ``keep`` marked slow.

    ``unpack``: a tuple case holds one value per argument name (False when the test takes a tuple as one argument).
    """
    out = []
    for index, case in enumerate(cases):
        if index < keep:
            out.append(case)
        elif isinstance(case, ParameterSet):
            out.append(pytest.param(*case.values, marks=(*case.marks, pytest.mark.slow), id=case.id))
        elif unpack and isinstance(case, tuple):
            out.append(pytest.param(*case, marks=pytest.mark.slow))
        else:
            out.append(pytest.param(case, marks=pytest.mark.slow))
    return out
