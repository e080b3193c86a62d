"""The paper's maths, floor 1: noise schedules and curricula (schedules), EDM and
boundary-condition preconditioning (precond), PF-ODE steps and samplers (solvers), an exact
Gaussian mixture (analytic) and shared random draws (rng). Pure functions over the contract
``D(x, sigma) -> x0`` and ``f(x, t) -> x_eps``; imports nothing of cmcore but floor 0.
"""
