"""How it is trained, floor 4: one loop for every method (loop: optimizer, EMA, target network,
CSV log), its checkpoint and resume files (checkpoints), data parallel under torchrun
(distributed) and the GPU fast-step options (fast). Models come from ``cmcore.models``; plots
of the log are left to the caller (the CLI).
"""
