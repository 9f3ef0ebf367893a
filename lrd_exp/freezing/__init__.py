"""Freezing the factors of decomposed layers: which factors exist (factors), which are frozen when (schedule),
and the Lightning callback that applies it (callback)."""

from lrd_exp.freezing.callback import FreezingCallback
from lrd_exp.freezing.factors import Factor, collect_factors, factor_costs, set_frozen
from lrd_exp.freezing.schedule import FreezeSchedule, FreezeState, schedule_states

__all__ = ["Factor", "FreezeSchedule", "FreezeState", "FreezingCallback", "collect_factors", "factor_costs",
           "schedule_states", "set_frozen"]
