"""The planner: measure how sensitive each MoE layer is, then solve the allocation.

Data flows one way: calibration text (``windows``) -> profiling (``profiling``,
with ``replay`` reusing work and ``losses`` scoring it) -> a
:class:`~allocplan.formats.profile.SensitivityProfile` -> the solvers (``problem``,
``solve_dp``, ``solve_ilp``, cross-checked in ``crosscheck``) -> a
:class:`~allocplan.formats.plan.Plan` (``solve``), with ``compile`` running all of
it on a loaded model and ``refine`` measuring allocations around the solved one.
The solvers and ``solve`` never import torch. Installed as ``allocplan.planner``::

    from allocplan.planner.solve import solve_profile
    from allocplan.planner.profiling import profile_model
"""
