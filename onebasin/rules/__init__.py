"""Permutation rules, one table per op family: `RULES[aten op] = rule(tracer, node) -> label`.

A rule reads its inputs' labels, records members, sites and shared permutations on the tracer, and
returns its output's label (see onebasin/tracer.py). An op with no entry is allowed only when nothing
permuted flows into it. Adding an op is one function and one table row (and one test row in
tests/test_rules.py).
"""

from . import attention, composite, elementwise, layers, movement, norms, slicing

RULES = {**elementwise.RULES, **movement.RULES, **slicing.RULES, **norms.RULES, **layers.RULES, **attention.RULES, **composite.RULES}

__all__ = ["RULES"]
