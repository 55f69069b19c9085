"""Walking a traced program: the tests that check what XLA will run count equations in it."""

from __future__ import annotations

import jax.extend.core


def equations(jaxpr, into_kernels: bool = True):
    """Every equation of `jaxpr` and of the jaxprs inside it (loops, jits, conds), in program
    order, each before its body. into_kernels=False leaves pallas_call bodies out: what XLA, not
    Pallas, runs."""
    for eqn in jaxpr.eqns:
        yield eqn
        if into_kernels or eqn.primitive.name != "pallas_call":
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from equations(getattr(sub, "jaxpr", sub), into_kernels)
