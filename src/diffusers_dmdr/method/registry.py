"""The training objectives by name (`--rl`): the trainer builds the one a run asks for."""

from .objective import DMDRObjective, Objective, Routes
from .rl import DPOObjective, GRPOObjective


OBJECTIVES: dict[str, type[Objective]] = {
    objective.name: objective for objective in (DMDRObjective, GRPOObjective, DPOObjective)
}


def make_objective(name: str, config, routes: Routes) -> Objective:
    """The objective registered as `name`, built for `config` and `routes`."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown training objective {name!r}; the objectives are {', '.join(sorted(OBJECTIVES))}.")
    return OBJECTIVES[name](config, routes)
