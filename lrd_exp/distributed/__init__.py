"""Several devices per job: DDP that follows the freeze schedule (ddp)."""

from lrd_exp.distributed.ddp import FreezeAwareDDPStrategy, ddp_strategy

__all__ = ["FreezeAwareDDPStrategy", "ddp_strategy"]
