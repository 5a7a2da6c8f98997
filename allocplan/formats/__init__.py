"""Pure data formats shared by the planner and the runtime.

What lives here is plain data and its arithmetic: the plan and the allocation it
carries, the sensitivity profile, the settings (configs and recipes), the budget
arithmetic and the strict YAML reading and writing they all use. Nothing here
imports torch, the planner or the runtime, so both sides (and ``allocplan solve``
or ``validate`` on a machine without torch) can import it::

    from allocplan.formats.plan import Plan, load_plan
    from allocplan.formats.config import ProfileConfig, RoutingConfig
"""
