"""Permutation rules, one table per op family: `RULES[aten op] = rule(tracer, node) -> label`.

A rule reads its inputs' labels, records members, sites and shared permutations on the tracer, and
returns its output's label (labels: onebasin/labels.py; the walk: onebasin/tracer.py). An op with no entry
is allowed only when nothing permuted flows into it. Adding an op is one function and one table row (and
one test row in tests/test_rules.py); a layer or norm op is one row of `onebasin.ops.LAYERS` / `NORMS`
(read by the generic rule here, REPAIR's fusion, functional matching and the orthogonal method) and one
case in tests/test_ops.py.
"""

from . import attention, composite, elementwise, layers, movement, norms, slicing

RULES = {**elementwise.RULES, **movement.RULES, **slicing.RULES, **norms.RULES, **layers.RULES, **attention.RULES, **composite.RULES}

__all__ = ["RULES"]
