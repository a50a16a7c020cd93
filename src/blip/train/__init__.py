"""Training: objectives (ITC/ITM/LM), the loop, schedules, and the `blip pretrain` command."""
from .config import TrainConfig
from .loop import FolderBusy, Trainer
from .objectives import MomentumTowers, PretrainObjective, StepInfo, tie_text_towers
from .tasks import build_objective  # a task's loss module for one's own loop: build_objective("caption", model)

__all__ = ["build_objective", "FolderBusy", "MomentumTowers", "PretrainObjective", "StepInfo", "TrainConfig", "Trainer", "tie_text_towers"]
