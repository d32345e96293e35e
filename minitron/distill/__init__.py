"""Knowledge distillation (logit KL + optional intermediate-state loss) and teacher correction.

`distill(teacher, student, data, cfg, out_dir=...)` trains a student against a frozen teacher;
`correct_teacher(teacher, data, cfg, out_dir=...)` fine-tunes the teacher on the corpus with the same loop.
Both run unchanged under `torchrun` (DDP, or FSDP2 with `parallel="fsdp"`). Training stages run them through
`minitron.distill.worker.launch(TrainJob(...))`: in-process on one device, under torchrun on several.
"""

from minitron.distill.loop import DistillConfig, DistillResult, check_compatible, correct_teacher, distill
from minitron.distill.loss import KDLossConfig, fused_kd_loss

__all__ = ["DistillConfig", "DistillResult", "KDLossConfig", "check_compatible", "correct_teacher", "distill",
           "fused_kd_loss"]
