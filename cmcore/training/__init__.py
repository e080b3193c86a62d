"""How it is trained, floor 4: one loop for every method (loop: runs, resume), its CSV log
(log), its step (step: micro-batches, optimizer, EMA, target network), its checkpoint and
resume files (checkpoints), each step's data rows (batches), the compute record (compute),
data parallel under torchrun (distributed) and the GPU fast-step options (fast). Models come
from ``cmcore.models``; plots of the log are left to the caller (the CLI).
"""
