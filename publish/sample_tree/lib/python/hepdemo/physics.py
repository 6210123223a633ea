"""Invariant mass of two massless particles, to give the demo something to compute."""

import math


def invariant_mass(e1: float, e2: float, angle: float) -> float:
    return math.sqrt(2 * e1 * e2 * (1 - math.cos(angle)))
